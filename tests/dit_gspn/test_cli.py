"""dit_gspn.cli.run_main: a user's mistake is one line `error: ...` and exit code 2 (with its traceback under
--debug); a bug of ours keeps its traceback."""
import pytest

from dit_gspn.cli import USER_ERROR, run_main
from dit_gspn.training import ConfigError


def test_run_main_prints_user_errors_as_one_line_and_keeps_the_traceback_of_a_bug(capsys, monkeypatch):
    monkeypatch.delenv("DIT_GSPN_DEBUG", raising=False)

    def mistake(argv):
        raise ConfigError("train.steps must be an integer >= 1, got -5\n(second line folded)")

    assert run_main(mistake, []) == USER_ERROR
    err = capsys.readouterr().err
    assert err == "error: train.steps must be an integer >= 1, got -5 (second line folded)\n"
    assert run_main(mistake, ["--debug"]) == USER_ERROR
    assert "Traceback" in capsys.readouterr().err

    def bug(argv):
        raise KeyError("a bug of ours")

    with pytest.raises(KeyError):
        run_main(bug, [])
