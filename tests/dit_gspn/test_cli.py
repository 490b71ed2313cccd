"""dit_gspn.cli.run_main: a user's mistake is one line `error: ...` and exit code 2 (with its traceback under
--debug); a bug of ours keeps its traceback."""
import re

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


def test_int_range_takes_the_bounds_and_refuses_the_rest_as_one_argparse_line():
    from dit_gspn.cli import MAX_SEED, ArgumentParser, int_range
    from dit_gspn.errors import UserError

    parser = ArgumentParser(prog="tool")
    parser.add_argument("--seed", type=int_range(0, MAX_SEED), default=0)
    parser.add_argument("--batch-size", type=int_range(1), default=2)
    assert parser.parse_args(["--seed", str(MAX_SEED), "--batch-size", str(10**20)]).seed == 2**63 - 1
    for argv, message in ((["--seed", "-1"], "argument --seed: must be an integer >= 0 and <= 2**63 - 1, got -1"),
                          (["--seed", str(2**63)], f"<= 2**63 - 1, got {2**63}"),
                          (["--batch-size", "0"], "argument --batch-size: must be an integer >= 1, got 0"),
                          (["--batch-size", "2.5"], "must be an integer, got '2.5'")):
        with pytest.raises(UserError, match=re.escape(message)):
            parser.parse_args(argv)
