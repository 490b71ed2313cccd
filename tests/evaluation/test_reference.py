"""`python -m evaluation.reference` (evaluation/reference.py): a reference's statistics from a user's folder of
images, the corrupt file skipped and named, chunk by chunk and resumable, equal to one pass over the same images."""
import numpy as np
import pytest
from PIL import Image

from dit_gspn.errors import UserError
from dit_gspn.metrics import evaluate
from evaluation.__main__ import main as evaluation_main

from helpers.inception import FAST, LAYER, images as inception_images


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _user_folder(root):
    """Class folders as users have them: sizes that differ, PNG and JPEG, a nested folder, one corrupt file."""
    rng = np.random.default_rng(3)
    sizes = {"cat/a.png": (40, 52), "cat/sub/b.jpg": (64, 48), "cat/c.png": (33, 33), "dog/d.png": (32, 90),
             "dog/e.jpg": (70, 70), "dog/f.png": (48, 40)}
    for name, (h, w) in sizes.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(inception_images(int(rng.integers(100)), (1.0, 0.7, 0.5))[0]).resize((w, h)).save(root / name)
    (root / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    return sorted(root / name for name in sizes)


def test_reference_from_a_user_folder_skips_the_corrupt_file_and_serves_the_evaluator(random_weights, sets,
                                                                                      tmp_path, capsys):
    from dit_gspn.data import center_crop_arr
    from evaluation.reference import main as reference_main

    folder = tmp_path / "my_images"
    good = _user_folder(folder)
    with pytest.raises(UserError, match="(readable image|same size).*evaluation.reference"):
        evaluate(sets["root"] / "a.npz", folder, metrics=["fid"], weights=random_weights, settings=FAST)

    ref, batch = tmp_path / "ref.npz", tmp_path / "ref_batch.npz"
    assert reference_main([str(folder), "--image-size", "32", "--out", str(ref), "--images-npz", str(batch),
                           "--weights", str(random_weights), "--chunk-size", "3", "--feature-layer", LAYER,
                           "--device", "cpu", "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert "from 6 of 7 files, skipped 1 unreadable" in out and "broken.png" in err
    assert "broken.png" in (tmp_path / "ref.npz.skipped.txt").read_text()
    assert not (tmp_path / "ref.npz.parts").exists()
    # The batch holds ADM's crop of every readable file, in sorted order.
    crops = np.stack([center_crop_arr(Image.open(p).convert("RGB"), 32) for p in good])
    with np.load(batch) as data:
        np.testing.assert_array_equal(data["arr_0"], crops)
    # Statistics merged over chunks equal those of one pass over the same images (the batch), sFID's included.
    evaluate(batch, save_stats=tmp_path / "batch_stats.npz", metrics=[], weights=random_weights, settings=FAST)
    with np.load(ref) as chunked, np.load(tmp_path / "batch_stats.npz") as whole:
        for key in ("mu", "sigma", "mu_s", "sigma_s"):
            np.testing.assert_allclose(chunked[key], whole[key], rtol=1e-9, atol=1e-12, err_msg=key)
    from_stats = evaluate(sets["root"] / "b.npz", ref, metrics=["fid"], weights=random_weights, settings=FAST)
    assert from_stats["inputs"][1]["kind"] == "stats" and from_stats["metrics"]["fid"] > 0
    assert evaluation_main([str(sets["root"] / "b.npz"), str(ref), "--weights", str(random_weights),
                            "--metrics", "fid", "--feature-layer", LAYER, "--device", "cpu", "--quiet"]) == 0


def test_reference_resumes_from_its_finished_chunks(random_weights, tmp_path, monkeypatch, capsys):
    import evaluation.reference as reference

    folder = tmp_path / "my_images"
    _user_folder(folder)
    kwargs = dict(weights=random_weights, chunk_size=2, feature_layer=LAYER, progress=False)
    whole = reference.build_reference(folder, tmp_path / "whole.npz", 32, images_npz=tmp_path / "whole_batch.npz",
                                      **kwargs)
    process, calls = reference.process_chunk, []

    def killed_after_two(*args, **kw):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(1)
        process(*args, **kw)

    monkeypatch.setattr(reference, "process_chunk", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        reference.build_reference(folder, tmp_path / "resumed.npz", 32, images_npz=tmp_path / "resumed_batch.npz",
                                  **kwargs)
    monkeypatch.setattr(reference, "process_chunk", process)
    resumed = reference.build_reference(folder, tmp_path / "resumed.npz", 32,
                                        images_npz=tmp_path / "resumed_batch.npz", **kwargs)
    assert resumed["reused_chunks"] == 2 and whole["reused_chunks"] == 0 and resumed["count"] == whole["count"] == 6
    with np.load(tmp_path / "whole.npz") as a, np.load(tmp_path / "resumed.npz") as b:
        for key in ("mu", "sigma", "mu_s", "sigma_s"):
            np.testing.assert_array_equal(a[key], b[key])
    assert (tmp_path / "whole_batch.npz").read_bytes() == (tmp_path / "resumed_batch.npz").read_bytes()
    with pytest.raises(UserError, match="already exists"):
        reference.build_reference(folder, tmp_path / "whole.npz", 32, **kwargs)


def test_the_crops_npz_is_streamed_a_batch_at_a_time_and_equals_np_savez_of_the_crops(random_weights, tmp_path,
                                                                                      monkeypatch):
    """Whatever the chunk size, no more than a batch of crops is handed on at a time, and the file is the bytes
    np.savez gives for all the crops."""
    import evaluation.reference as reference
    from dit_gspn.data import center_crop_arr
    from dit_gspn.image_npz import ImageNpzWriter

    folder = tmp_path / "my_images"
    good = _user_folder(folder)
    appended, append = [], ImageNpzWriter.append

    def recording(self, images, labels=None):
        appended.append(len(images))
        append(self, images, labels)

    monkeypatch.setattr(ImageNpzWriter, "append", recording)
    batch = tmp_path / "ref_batch.npz"
    reference.build_reference(folder, tmp_path / "ref.npz", 32, weights=random_weights, images_npz=batch,
                              chunk_size=100, batch_size=2, feature_layer=LAYER, progress=False)
    assert sum(appended) == len(good) and max(appended) <= 2
    crops = np.stack([center_crop_arr(Image.open(p).convert("RGB"), 32) for p in good])
    with open(tmp_path / "savez.npz", "wb") as file:
        np.savez(file, crops)
    assert batch.read_bytes() == (tmp_path / "savez.npz").read_bytes()
