"""Another process that holds a folder's lock, as a running command would, until the test kills it."""
import os
import subprocess
import sys

from helpers.repo import REPO


HOLD = ("import sys, time\nfrom dit_gspn.folder_lock import lock_folder\nlock_folder(sys.argv[1])\n"
        "print('locked', flush=True)\ntime.sleep(300)\n")


def child_env(**extra) -> dict:
    """The environment of a child process that runs this checkout's code, offline, on one thread."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **extra}
    env.pop("DIT_GSPN_DEBUG", None)
    return env


def hold_lock(folder) -> subprocess.Popen:
    """A process (of this checkout's code) that has taken ``folder``'s lock; returns once it holds it."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], cwd=REPO, env=child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.strip() == "locked", proc.stderr.read()
    return proc
