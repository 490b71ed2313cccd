"""A command's ``main`` run in this process as a user would see it: its exit code and its one ``error: ...``
line."""
import subprocess

from dit_gspn.cli import USER_ERROR, run_main
from helpers.training import reset_accelerate


def run_here(main, argv, capsys) -> subprocess.CompletedProcess:
    """``run_main(main, argv)`` in this process (what the command does after its imports), as a
    CompletedProcess; cheaper than a subprocess on a busy 2-core machine."""
    capsys.readouterr()
    code = run_main(main, [str(a) for a in argv])
    reset_accelerate()
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(argv, code, captured.out, captured.err)


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    """The command failed with USER_ERROR and one `error: ...` line containing every fragment, no traceback."""
    assert proc.returncode == USER_ERROR, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]
