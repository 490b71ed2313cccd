"""A user's mistake at `python -m evaluation` costs one line, never a file: each case runs the command's main as a
user would and checks exit code 2, the one `error: ...` line naming the path, and that the files are untouched.
Every refusal comes before the work: the cases pass Inception weights that do not exist, so a check made after
the weights load would name the weights instead."""
import contextlib
import os
import subprocess

import numpy as np
import pytest

from dit_gspn.image_npz import write_npz
from evaluation.__main__ import main as evaluation_main

from helpers.commands import assert_one_line_error, run_here


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def files(tmp_path):
    """Samples and a reference's statistics as a user has them, and weights that do not exist."""
    rng = np.random.default_rng(0)
    samples = write_npz(tmp_path / "samples.npz", rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8))
    stats = tmp_path / "real_stats.npz"
    np.savez(stats, mu=np.zeros(8), sigma=np.eye(8), mu_s=np.zeros(5), sigma_s=np.eye(5))
    return dict(samples=samples, stats=stats, weights=tmp_path / "no-weights.pt", root=tmp_path)


def _snapshot(folder):
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _evaluate(capsys, *args):
    return run_here(evaluation_main, [*map(str, args), "--device", "cpu", "--quiet"], capsys)


def test_save_stats_refuses_to_overwrite_a_reference(files, capsys):
    before = _snapshot(files["root"])
    proc = _evaluate(capsys, files["samples"], "--save-stats", files["stats"], "--weights", files["weights"])
    assert_one_line_error(proc, f"--save-stats {files['stats']} already exists")
    assert _snapshot(files["root"]) == before


@pytest.mark.parametrize("damage, fragments", [
    (lambda d: d.update(mu=np.arange(8)), ["mu has dtype int64", "floating point"]),
    (lambda d: d.update(sigma=np.eye(8, 9)), ["mu must be (D,) and sigma (D, D)", "(8,) and (8, 9)"]),
    (lambda d: d["sigma_s"].__setitem__((1, 2), np.nan), ["sigma_s holds 1 NaN or infinite values"]),
], ids=["dtype", "shape", "nan"])
def test_a_statistics_file_that_is_not_what_it_claims_is_named_with_its_key(files, capsys, damage, fragments):
    with np.load(files["stats"]) as data:
        arrays = {k: data[k].copy() for k in data.files}
    damage(arrays)
    bad = files["root"] / "bad_stats.npz"
    np.savez(bad, **arrays)
    before = _snapshot(files["root"])
    proc = _evaluate(capsys, files["samples"], bad, "--weights", files["weights"])
    assert_one_line_error(proc, str(bad), *fragments)
    assert _snapshot(files["root"]) == before


def test_an_npz_without_images_is_named(files, capsys):
    empty = files["root"] / "empty.npz"
    np.savez(empty, np.zeros((0, 16, 16, 3), np.uint8))
    assert_one_line_error(_evaluate(capsys, empty, files["stats"], "--weights", files["weights"]),
                          str(empty), "holds no images: arr_0 is empty")
    nothing = files["root"] / "nothing.npz"
    np.savez(nothing, labels=np.arange(3))
    assert_one_line_error(_evaluate(capsys, nothing, files["stats"], "--weights", files["weights"]),
                          str(nothing), "has neither arr_0 (images) nor mu and sigma")


@contextlib.contextmanager
def _read_only(folder):
    """``folder`` made read-only: by its mode for a normal user; for root, whom modes do not stop, by a read-only
    bind mount (skipped where mounting is not allowed)."""
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield folder
        finally:
            folder.chmod(0o755)
        return
    mounted = subprocess.run(f"mount --bind {folder} {folder} && mount -o remount,ro,bind {folder}", shell=True,
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"root cannot make a read-only folder here: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_outputs_that_cannot_be_written_are_refused_before_the_work(files, capsys):
    root, args = files["root"], [files["samples"], files["stats"], "--weights", files["weights"]]
    (root / "a_folder").mkdir()
    (root / "a_file").write_text("not a folder")
    before = _snapshot(root)
    for flag, value, fragment in (("--report", root / "a_folder", "is a folder"),
                                  ("--save-stats", root / "a_folder", "is a folder"),
                                  ("--cache-dir", root / "a_file", "is a file, not a folder"),
                                  ("--report", root / "a_file" / "r.json", "a_file is a file, not a folder")):
        assert_one_line_error(_evaluate(capsys, *args, flag, value), f"{flag} {value}", fragment)
    assert _snapshot(root) == before
    with _read_only(root / "locked") as locked:
        for flag, value in (("--report", locked / "r.json"), ("--cache-dir", locked / "cache"),
                            ("--save-stats", locked / "sub" / "s.npz")):
            assert_one_line_error(_evaluate(capsys, *args, flag, value), f"{flag} {value}", "cannot be written")
        assert list(locked.iterdir()) == []
