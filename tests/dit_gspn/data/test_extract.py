"""Data: ADM's crop, class folders with corrupt files, resumable latent extraction with a tiny VAE,
the lazy latent-shard dataset and its errors, and the built-in shapes dataset."""
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from dit_gspn.data import (SHAPE_CLASSES, ClassFolderImages, LatentShardDataset, ShapesDataset, ShardError,
                           center_crop_arr, make_shapes)
from dit_gspn.data.extract import extract_latents
from dit_gspn.seeding import Stream, index_generator

SIZE = 16


def test_center_crop_arr_keeps_the_centre_and_size():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (40, 70, 3), dtype=np.uint8)
    arr[14:26, 29:41] = (255, 0, 0)  # a red square at the centre
    out = center_crop_arr(Image.fromarray(arr), SIZE)
    assert out.shape == (SIZE, SIZE, 3) and out.dtype == np.uint8
    assert (out[6:10, 6:10, 0] > 200).all() and (out[6:10, 6:10, 1:] < 60).all()
    exact = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    np.testing.assert_array_equal(center_crop_arr(Image.fromarray(exact), SIZE), exact)


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    """Two classes of random JPEG/PNG images, plus one corrupt .jpg and one text file."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(1)
    for cls in ("cat", "dog"):
        (root / cls).mkdir()
        for i in range(5):
            arr = rng.integers(0, 256, (20 + 3 * i, 24, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / cls / f"{i}.{'png' if i % 2 else 'jpg'}")
    (root / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    (root / "dog" / "notes.txt").write_text("not an image")
    return root


def test_class_folder_labels_and_corrupt_files(image_root):
    ds = ClassFolderImages(image_root, SIZE)
    assert ds.class_names == ["cat", "dog"] and len(ds) == 12
    items = [ds[i] for i in range(len(ds))]
    bad = sorted(os.path.basename(it["path"]) for it in items if it["error"])
    assert bad == ["broken.jpg", "notes.txt"]
    good = [it for it in items if it["image"] is not None]
    assert [it["label"] for it in good] == [0] * 5 + [1] * 5
    assert good[0]["image"].shape == (3, SIZE, SIZE) and -1 <= good[0]["image"].min() < good[0]["image"].max() <= 1


@pytest.fixture(scope="module")
def tiny_vae_path(tmp_path_factory):
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
                        norm_num_groups=8, sample_size=SIZE)
    path = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(path)
    return str(path)


def test_extraction_shards_index_resume_and_dataset(image_root, tiny_vae_path, tmp_path, fresh_accelerate_state):
    from diffusers import AutoencoderKL
    out = tmp_path / "latents"
    index = extract_latents(image_root, out, vae=tiny_vae_path, image_size=SIZE, shard_size=5, batch_size=8,
                            num_workers=0, latent_dtype="float32", seed=3)
    assert index["num_latents"] == 10 and index["num_skipped"] == 2 and len(index["shards"]) == 3
    skipped = sorted(os.path.basename(p) for s in index["shards"] for p, _ in s["skipped"])
    assert skipped == ["broken.jpg", "notes.txt"]
    assert index["latent_shape"] == [4, SIZE // 2, SIZE // 2] and index["class_names"] == ["cat", "dog"]

    # Oracle: shard 0 is images 0..4 encoded by the VAE with the shard's generator, originals then flips.
    vae = AutoencoderKL.from_pretrained(tiny_vae_path)
    images = ClassFolderImages(image_root, SIZE)
    x = torch.stack([images[i]["image"] for i in range(5)])
    gen = index_generator(3, 0, stream=Stream.LATENT_ENCODING)
    with torch.no_grad():
        want = vae.encode(x).latent_dist.sample(generator=gen) * 0.18215
        want_flip = vae.encode(x.flip(-1)).latent_dist.sample(generator=gen) * 0.18215
    shard0 = load_file(out / "shard-00000.safetensors")
    torch.testing.assert_close(shard0["latents"], want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(shard0["latents_flipped"], want_flip, rtol=1e-4, atol=1e-5)

    # Resume: a lost shard is redone bit for bit; complete shards are not touched.
    first = (out / "shard-00000.safetensors").stat().st_mtime_ns
    lost = (out / "shard-00001.safetensors").read_bytes()
    (out / "shard-00001.safetensors").unlink()
    extract_latents(image_root, out, vae=tiny_vae_path, image_size=SIZE, shard_size=5, batch_size=8,
                    num_workers=0, latent_dtype="float32", seed=3)
    assert (out / "shard-00000.safetensors").stat().st_mtime_ns == first
    assert (out / "shard-00001.safetensors").read_bytes() == lost

    ds = LatentShardDataset(out, expected_shape=(4, SIZE // 2, SIZE // 2), num_classes=2, flip=True)
    assert len(ds) == 20 and not ds._handles
    all_latents = torch.cat([load_file(out / f"shard-0000{k}.safetensors")["latents"] for k in range(3)])
    all_flipped = torch.cat([load_file(out / f"shard-0000{k}.safetensors")["latents_flipped"] for k in range(3)])
    for i in (0, 4, 5, 8):  # shard 1 holds dog 0..3 (cat/broken.jpg skipped), shard 2 dog 4
        latent, label = ds[i]
        torch.testing.assert_close(latent, all_latents[i], rtol=0, atol=0)
        assert label == (0 if i < 5 else 1)
        torch.testing.assert_close(ds[i + 10][0], all_flipped[i], rtol=0, atol=0)
    assert set(ds._handles) == {0, 1}  # only the shards actually read were opened

    with pytest.raises(ShardError, match=r"shape \(4, 8, 8\).*\(4, 16, 16\)"):
        LatentShardDataset(out, expected_shape=(4, 16, 16))
    with pytest.raises(ShardError, match=r"shard-0000[12].*labels \[1\] outside \[0, 1\)"):
        LatentShardDataset(out, num_classes=1)
    shard2 = out / "shard-00002.safetensors"
    shard2.write_bytes(shard2.read_bytes()[:-7])
    with pytest.raises(ShardError, match="shard-00002.safetensors is truncated"):
        LatentShardDataset(out)


def test_missing_index_names_the_file(tmp_path):
    with pytest.raises(ShardError, match="index.json not found"):
        LatentShardDataset(tmp_path)


def test_shapes_are_seeded_balanced_and_recognisable_by_colour():
    a_img, a_lab = make_shapes(4, seed=7)
    b_img, b_lab = make_shapes(4, seed=7)
    c_img, _ = make_shapes(4, seed=8)
    np.testing.assert_array_equal(a_img, b_img)
    assert not np.array_equal(a_img, c_img)
    assert np.bincount(a_lab).tolist() == [4] * len(SHAPE_CLASSES)
    # The shape's colour (the pixels farthest from the background median) names the class, except
    # for the pairs of classes that share hue families, which the shape tells apart instead.
    from dit_gspn.data.shapes import _COLOURS
    for img, lab in zip(a_img.astype(float), a_lab):
        flat = img.reshape(-1, 3)
        dist = np.linalg.norm(flat - np.median(flat, axis=0), axis=1)
        colour = flat[dist > 0.5 * dist.max()].mean(axis=0)
        assert np.argmin(np.linalg.norm(_COLOURS - colour, axis=1)) == lab


def test_shapes_dataset_flip_doubles_with_mirrored_copies():
    ds = ShapesDataset(num_per_class=2, seed=1, flip=True)
    assert len(ds) == 40 and ds.num_classes == 10
    img, label = ds[3]
    img_f, label_f = ds[23]
    assert label == label_f == 3 and img.shape == (3, 32, 32) and -1 <= img.min() < img.max() <= 1
    torch.testing.assert_close(img_f, img.flip(-1))
