"""The folder lock across the processes of one launch: two ranks of train.py on a run folder that another process
holds are refused together, both at once, never one waiting for the other."""
import subprocess
import sys

import pytest

from helpers.folder_lock import child_env
from helpers.repo import REPO
from helpers.training import tiny_config, write_config


def test_both_processes_of_a_launch_are_refused_at_once_when_the_run_folder_is_in_use(lock_holder, tmp_path):
    folder, proc = lock_holder
    config = write_config(tmp_path / "c.yaml", tiny_config(folder, train={"steps": 2, "grad_accum_steps": 1}))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           str(REPO / "train.py"), "--config", str(config)]
    done = subprocess.run(cmd, env=child_env(ACCELERATE_USE_CPU="true"), cwd=REPO, capture_output=True,
                          text=True, timeout=240)  # a rank left waiting for the other would hang here
    refusals = [line for line in done.stderr.splitlines()
                if line.startswith("error: ") and f"in use by process {proc.pid}" in line]
    assert done.returncode != 0 and len(refusals) == 2, done.stderr[-3000:]
    assert not (folder / "checkpoints").exists() or not any((folder / "checkpoints").iterdir())
