"""Batch sampling as sample.py runs it, in real processes: two processes draw what one does, a killed run
resumes to the uninterrupted run's file, a kill during assembly or before the provenance file is finished by
the same command, and a full disk or a second job on the same output costs one line and no finished shard."""
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from dit_gspn.ops.gspn_scan import gspn_scan_impl
from dit_gspn.atomic_write import temporary_sibling
from dit_gspn.image_npz import read_npz
from dit_gspn import image_npz

from helpers.commands import assert_one_line_error, run_here
from helpers.entry_points import load_script
from helpers.repo import REPO
from helpers.tiny_models import tiny_dit, write_training_checkpoint


pytestmark = pytest.mark.usefixtures("one_torch_thread")


NUM, SHARD, STEPS = 12, 2, 6
BATCH_ARGS = ["--num-steps", str(STEPS), "--num-samples", str(NUM), "--batch-size", str(SHARD),
              "--class-mode", "balanced", "--seed", "7", "--sampler", "ddpm", "--cfg-scale", "2"]


def _env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", DIT_GSPN_SCAN_IMPL="reference", OMP_NUM_THREADS="1",
               ACCELERATE_USE_CPU="true")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def _sample_py(*args, launcher=(sys.executable,), **kwargs):
    return subprocess.run([*launcher, str(REPO / "sample.py"), *map(str, args)], env=_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=300, **kwargs)


@pytest.fixture(scope="module")
def batch_ckpt(tmp_path_factory):
    """A tiny GSPN-DiT training checkpoint and its uninterrupted one-process batch run (the oracle)."""
    root = tmp_path_factory.mktemp("batch")
    with gspn_scan_impl("reference"):
        write_training_checkpoint(root / "ckpt", tiny_dit(num_classes=4), class_names=["w", "x", "y", "z"])
    done = _sample_py("--ckpt", root / "ckpt", *BATCH_ARGS, "--out", root / "ref.npz")
    assert done.returncode == 0, done.stderr[-3000:]
    return root


def test_two_process_run_draws_every_index_once_and_equals_one_process(batch_ckpt):
    launcher = (sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no")
    out = batch_ckpt / "two.npz"
    done = _sample_py("--ckpt", batch_ckpt / "ckpt", *BATCH_ARGS, "--out", out, "--keep-shards", launcher=launcher)
    assert done.returncode == 0, done.stderr[-3000:]
    indices, ranks = [], set()
    for shard in sorted((batch_ckpt / "two.npz.shards").glob("shard_*.npz")):
        with np.load(shard) as data:
            indices += data["indices"].tolist()
            ranks.add(int(data["rank"]))
    assert sorted(indices) == list(range(NUM)) and len(indices) == NUM
    assert ranks == {0, 1}
    ref_images, ref_labels = read_npz(batch_ckpt / "ref.npz")
    images, labels = read_npz(out)
    np.testing.assert_array_equal(images, ref_images)
    np.testing.assert_array_equal(labels, ref_labels)
    assert images.shape == (NUM, 8, 8, 3) and np.bincount(labels).tolist() == [3, 3, 3, 3]


def test_killed_and_resumed_run_equals_uninterrupted_run(batch_ckpt):
    out = batch_ckpt / "killed.npz"
    shard_dir = batch_ckpt / "killed.npz.shards"
    proc = subprocess.Popen([sys.executable, str(REPO / "sample.py"), "--ckpt", str(batch_ckpt / "ckpt"),
                             *BATCH_ARGS, "--out", str(out)], env=_env(), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not list(shard_dir.glob("shard_*.npz")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = {p: p.stat().st_mtime_ns for p in shard_dir.glob("shard_*.npz")}
    assert not out.exists() and 1 <= len(finished) < NUM // SHARD, "the kill did not land mid-run"

    done = _sample_py("--ckpt", batch_ckpt / "ckpt", *BATCH_ARGS, "--out", out, "--keep-shards")
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"skipped {len(finished)} finished" in done.stdout
    for path, mtime in finished.items():
        assert path.stat().st_mtime_ns == mtime, f"{path.name} was drawn again"
    ref_images, ref_labels = read_npz(batch_ckpt / "ref.npz")
    images, labels = read_npz(out)
    np.testing.assert_array_equal(images, ref_images)
    np.testing.assert_array_equal(labels, ref_labels)


#: Code run before sample.py by ``sample_py_patched``: kill the process after the second shard went into the final
#: .npz, or after the .npz before its provenance file, or hold it (and the --out's lock) after its first shard.
KILL_DURING_ASSEMBLY = ("import dit_gspn.image_npz as m\n"
                        "append = m.ImageNpzWriter.append\n"
                        "def killing(self, *a):\n"
                        "    append(self, *a)\n"
                        f"    if self.written > 2 * {SHARD}: os.kill(os.getpid(), signal.SIGKILL)\n"
                        "m.ImageNpzWriter.append = killing\n")


KILL_BEFORE_PROVENANCE = ("import dit_gspn.sampling.batch as m\n"
                          "m.write_provenance = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)\n")


HOLD_AFTER_FIRST_SHARD = ("import time, dit_gspn.sampling.batch as m\n"
                          "save = m.savez_atomically\n"
                          "def holding(*a, **k):\n"
                          "    save(*a, **k)\n"
                          "    time.sleep(600)\n"
                          "m.savez_atomically = holding\n")


def sample_py_patched(patch: str, *args, popen: bool = False):
    """sample.py in a subprocess that runs ``patch`` first (one of the constants above): its CompletedProcess,
    or with ``popen`` the running Popen."""
    code = (f"import os, runpy, signal, sys\n{patch}sys.argv = ['sample.py', *sys.argv[1:]]\n"
            f"runpy.run_path({str(REPO / 'sample.py')!r}, run_name='__main__')\n")
    command = [sys.executable, "-c", code, *map(str, args)]
    if popen:
        return subprocess.Popen(command, env=_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return subprocess.run(command, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=300)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if ".partial" in p.name or ".tmp" in p.name)


def test_a_kill_during_assembly_then_the_same_command_gives_the_same_file_and_no_partial_one(batch_ckpt, tmp_path):
    args = ["--ckpt", batch_ckpt / "ckpt", *BATCH_ARGS, "--out", tmp_path / "samples.npz"]
    killed = sample_py_patched(KILL_DURING_ASSEMBLY, *args)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    left = _leftovers(tmp_path)
    assert not (tmp_path / "samples.npz").exists() and len(left) == 1 and left[0].startswith(".samples.npz.tmp")
    done = _sample_py(*args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "samples.npz").read_bytes() == (batch_ckpt / "ref.npz").read_bytes()
    assert _leftovers(tmp_path) == [] and not (tmp_path / "samples.npz.shards").exists()
    assert json.loads((tmp_path / "samples.provenance.json").read_text())["count"] == NUM


def test_a_kill_before_the_provenance_file_or_a_deleted_output_is_finished_by_the_same_command(batch_ckpt, tmp_path):
    out, provenance = tmp_path / "samples.npz", tmp_path / "samples.provenance.json"
    args = ["--ckpt", batch_ckpt / "ckpt", *BATCH_ARGS, "--out", out]
    killed = sample_py_patched(KILL_BEFORE_PROVENANCE, *args)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert out.is_file() and not provenance.exists() and (tmp_path / "samples.npz.shards").is_dir()
    done = _sample_py(*args)  # the .npz without its provenance beside its shards: this job, unfinished
    assert done.returncode == 0, done.stderr[-3000:]
    assert out.read_bytes() == (batch_ckpt / "ref.npz").read_bytes() and provenance.is_file()
    assert f"skipped {NUM // SHARD} finished" in done.stdout  # nothing was drawn again

    out.unlink()  # the user deletes the samples; the provenance file stays behind
    again = _sample_py(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "describes no samples.npz any more; it will be replaced" in again.stderr
    assert out.read_bytes() == (batch_ckpt / "ref.npz").read_bytes()
    refused = _sample_py(*args)  # finished: the same command now refuses to overwrite it
    assert refused.returncode == 2 and "already exists" in refused.stderr


def _snapshot(folder):
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


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
            raise _no_space(temporary_sibling(self.path))
        append(self, images, labels)

    monkeypatch.setattr(image_npz.ImageNpzWriter, "append", filling_up)
    proc = _sample(batch_ckpt, out, capsys)
    assert_one_line_error(proc, f"no space left on {tmp_path} while writing samples.npz",
                          "the files written before it are kept", "run the command again")
    assert not out.exists() and _leftovers(tmp_path) == []
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
