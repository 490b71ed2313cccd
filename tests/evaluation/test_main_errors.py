"""A user's mistake on the evaluation and batch-sampling side costs one line, never a file or a run: each case runs
the command as a user would (its main, or a subprocess) and checks exit code 2, the one `error: ...` line naming
the path, and that the files are untouched. Every refusal comes before the work: the evaluation cases pass
Inception weights that do not exist, so a check made after the weights load would name the weights instead."""
import contextlib
import errno
import os
import signal
import subprocess
import time

import numpy as np
import pytest

from dit_gspn import image_npz
from dit_gspn.image_npz import write_npz
from helpers.entry_points import load_script
from evaluation.__main__ import main as evaluation_main
from test_sampling import BATCH_ARGS, HOLD_AFTER_FIRST_SHARD, NUM, SHARD, batch_ckpt, sample_py_patched  # noqa: F401
from test_user_errors import assert_one_line_error, run_here


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    yield


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


# --- batch sampling ----------------------------------------------------------------------------------------------

def _no_space(path):
    return OSError(errno.ENOSPC, "No space left on device", str(path))


def _sample(batch_ckpt, out, capsys, *extra):
    main = load_script("sample").main
    return run_here(main, ["--ckpt", batch_ckpt / "ckpt", *BATCH_ARGS, "--out", out, *extra], capsys)


def test_a_full_disk_during_a_shard_names_the_path_removes_the_partial_file_and_keeps_finished_shards(
        batch_ckpt, tmp_path, capsys, monkeypatch):
    out, shards = tmp_path / "samples.npz", tmp_path / "samples.npz.shards"
    savez, written = np.savez, []

    def filling_up(file, *args, **kwargs):
        if len(written) == 2:  # the third shard: some bytes reach the file, then the disk is full
            file.write(b"PK partial shard")
            raise _no_space(file.name)
        written.append(1)
        savez(file, *args, **kwargs)

    monkeypatch.setattr(np, "savez", filling_up)
    proc = _sample(batch_ckpt, out, capsys)
    assert_one_line_error(proc, f"no space left on {shards} while writing shard_000002.npz",
                          "the files written before it are kept", "run the command again")
    assert sorted(p.name for p in shards.iterdir()) == [".lock", "run.json", "shard_000000.npz", "shard_000001.npz"]
    assert not out.exists()
    monkeypatch.setattr(np, "savez", savez)
    done = _sample(batch_ckpt, out, capsys)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "skipped 2 finished" in done.stdout and out.read_bytes() == (batch_ckpt / "ref.npz").read_bytes()


def test_a_full_disk_during_the_final_npz_names_it_removes_it_and_keeps_every_shard(batch_ckpt, tmp_path, capsys,
                                                                                    monkeypatch):
    out, shards = tmp_path / "samples.npz", tmp_path / "samples.npz.shards"
    append = image_npz.ImageNpzWriter.append

    def filling_up(self, images, labels=None):
        if self.written:
            raise _no_space(self.partial)
        append(self, images, labels)

    monkeypatch.setattr(image_npz.ImageNpzWriter, "append", filling_up)
    proc = _sample(batch_ckpt, out, capsys)
    assert_one_line_error(proc, f"no space left on {out}", f"{out} was not written", f"kept in {shards}")
    assert not out.exists() and not list(tmp_path.rglob("*.partial"))
    assert len(list(shards.glob("shard_*.npz"))) == NUM // SHARD


def test_a_second_job_on_the_same_out_is_refused_and_a_killed_jobs_lock_blocks_nothing(batch_ckpt, tmp_path,
                                                                                       capsys):
    out, shards = tmp_path / "samples.npz", tmp_path / "samples.npz.shards"
    first = sample_py_patched(HOLD_AFTER_FIRST_SHARD, "--ckpt", batch_ckpt / "ckpt", *BATCH_ARGS, "--out", out,
                              popen=True)
    try:
        deadline = time.monotonic() + 240
        while not list(shards.glob("shard_*.npz")) and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert first.poll() is None, "the first job ended before it could hold the lock"
        before = _snapshot(tmp_path)
        second = _sample(batch_ckpt, out, capsys)
        assert_one_line_error(second, f"is in use by process {first.pid}", f"--out {out}")
        assert _snapshot(tmp_path) == before
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    done = _sample(batch_ckpt, out, capsys)  # the killed job's lock is gone with it
    assert done.returncode == 0, done.stderr[-3000:]
    assert out.read_bytes() == (batch_ckpt / "ref.npz").read_bytes()
