"""dit_gspn.folder_lock: one command per folder, the holder named, a killed holder's lock gone, and the
processes of one launch taken as one command (refused together, never waiting for each other)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dit_gspn.folder_lock import LOCK_FILE, FolderInUseError, decide_on_main_process, lock_folder, release_folder
from helpers.repo import REPO

HOLD = ("import sys, time\nfrom dit_gspn.folder_lock import lock_folder\nlock_folder(sys.argv[1])\n"
        "print('locked', flush=True)\ntime.sleep(300)\n")


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture
def holder(tmp_path):
    """A process that holds ``tmp_path / "held"``'s lock until killed."""
    folder = tmp_path / "held"
    folder.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], env=_env(), stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    yield folder, proc
    proc.kill()
    proc.wait()


def test_a_held_folder_is_refused_naming_the_holder_and_free_once_it_is_killed(holder):
    folder, proc = holder
    with pytest.raises(FolderInUseError, match=rf"{folder} is in use by process {proc.pid} on "):
        lock_folder(folder, "a test")
    proc.kill()
    proc.wait()
    assert lock_folder(folder) == folder / LOCK_FILE  # the kernel dropped the dead holder's lock
    assert (folder / LOCK_FILE).read_text().startswith(f"process {os.getpid()} on ")
    release_folder(folder)


def test_a_process_may_take_its_own_lock_again_and_release_it_for_others(tmp_path):
    lock_folder(tmp_path)
    lock_folder(tmp_path)  # a second run in the same Python session
    other = subprocess.run([sys.executable, "-c", HOLD.replace("time.sleep(300)", "pass"), str(tmp_path)],
                           env=_env(), capture_output=True, text=True)
    assert other.returncode != 0 and f"in use by process {os.getpid()}" in other.stderr
    release_folder(tmp_path)
    other = subprocess.run([sys.executable, "-c", HOLD.replace("time.sleep(300)", "pass"), str(tmp_path)],
                           env=_env(), capture_output=True, text=True)
    assert other.returncode == 0 and other.stdout.strip() == "locked"


class _State:
    def __init__(self, main: bool):
        self.is_main_process, self.num_processes = main, 1


def test_the_main_process_decides_and_its_refusal_is_raised():
    calls = []

    def refuse():
        calls.append(1)
        raise FolderInUseError("taken")

    with pytest.raises(FolderInUseError, match="taken"):
        decide_on_main_process(_State(main=True), refuse)
    decide_on_main_process(_State(main=False), refuse)  # not the main process: not run
    assert calls == [1]


def test_both_processes_of_a_launch_are_refused_at_once_when_the_run_folder_is_in_use(holder, tmp_path):
    from helpers.training import tiny_config, write_config

    folder, proc = holder
    config = write_config(tmp_path / "c.yaml", tiny_config(folder, train={"steps": 2, "grad_accum_steps": 1}))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           str(REPO / "train.py"), "--config", str(config)]
    done = subprocess.run(cmd, env={**_env(), "ACCELERATE_USE_CPU": "true"}, cwd=REPO, capture_output=True,
                          text=True, timeout=240)  # a rank left waiting for the other would hang here
    refusals = [line for line in done.stderr.splitlines()
                if line.startswith("error: ") and f"in use by process {proc.pid}" in line]
    assert done.returncode != 0 and len(refusals) == 2, done.stderr[-3000:]
    assert not (folder / "checkpoints").exists() or not any((folder / "checkpoints").iterdir())
