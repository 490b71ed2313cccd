"""dit_gspn.folder_lock: one command per folder, the holder named, a killed holder's lock gone, and the
main process's decision raised (tests/integration/test_folder_lock.py: the processes of one launch refused
together)."""
import os
import subprocess
import sys

import pytest

from dit_gspn.folder_lock import (LOCK_FILE, FolderInUseError, MainProcessFailed, decide_on_main_process, lock_folder,
                                  release_folder)

from helpers.folder_lock import HOLD, child_env


def test_a_held_folder_is_refused_naming_the_holder_and_free_once_it_is_killed(lock_holder):
    folder, proc = lock_holder
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
                           env=child_env(), capture_output=True, text=True)
    assert other.returncode != 0 and f"in use by process {os.getpid()}" in other.stderr
    release_folder(tmp_path)
    other = subprocess.run([sys.executable, "-c", HOLD.replace("time.sleep(300)", "pass"), str(tmp_path)],
                           env=child_env(), capture_output=True, text=True)
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


class _Launch:
    """Two processes of one launch in this one process: what the main process broadcasts is what the other one
    receives (``accelerate.utils.broadcast_object_list`` faked)."""

    def __init__(self, monkeypatch):
        import accelerate.utils

        self.sent = []

        def broadcast(objects):
            if self.sent:  # the other process receives what the main process sent
                return [self.sent[-1]]
            self.sent.append(objects[0])
            return objects

        monkeypatch.setattr(accelerate.utils, "broadcast_object_list", broadcast)

    def rank(self, main: bool):
        state = _State(main=main)
        state.num_processes = 2
        return state


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), KeyError("a bug of ours"),
                                   FolderInUseError("taken")], ids=lambda e: type(e).__name__)
def test_every_failure_of_the_main_process_stops_the_other_processes_too(monkeypatch, error):
    launch = _Launch(monkeypatch)

    def check():
        raise error

    with pytest.raises(type(error)) as raised:
        decide_on_main_process(launch.rank(main=True), check)
    assert raised.value is error  # the main process keeps its own exception and traceback
    assert launch.sent and launch.sent[0] is not None  # the others are told, whatever the exception
    expected = type(error) if isinstance(error, FolderInUseError) else MainProcessFailed
    with pytest.raises(expected) as other:
        decide_on_main_process(launch.rank(main=False), lambda: pytest.fail("checked on another process"))
    assert str(error) in str(other.value)
    if expected is MainProcessFailed:
        assert type(error).__name__ in str(other.value)


def test_a_main_process_that_passes_lets_every_process_go_on(monkeypatch):
    launch = _Launch(monkeypatch)
    decide_on_main_process(launch.rank(main=True), lambda: None)
    decide_on_main_process(launch.rank(main=False), lambda: pytest.fail("checked on another process"))
    assert launch.sent == [None]
