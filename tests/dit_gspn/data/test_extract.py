"""dit_gspn.data.extract: resumable latent extraction with a tiny VAE into shards and an index, read back by the
lazy latent-shard dataset, whose errors name the shard."""
import os

import pytest
import torch
from safetensors.torch import load_file

from dit_gspn.data import ClassFolderImages, LatentShardDataset, ShardError
from dit_gspn.data.extract import extract_latents
from dit_gspn.seeding import Stream, index_generator


SIZE = 16


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
