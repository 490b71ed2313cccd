"""`python -m evaluation` (evaluation/__main__.py): the JSON report it writes and prints, with the samples'
provenance file copied into it."""
import json

import numpy as np
import pytest

from dit_gspn.image_npz import write_npz
from evaluation.__main__ import main as evaluation_main

from helpers.commands import assert_one_line_error, run_here
from helpers.inception import LAYER, N


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_cli_writes_the_json_report(full_report, sets, random_weights, tmp_path, capsys):
    root = sets["root"]
    code = evaluation_main([str(root / "a.npz"), str(root / "b.npz"), "--metrics", "fid", "--weights",
                            str(random_weights), "--cache-dir", str(root / "cache"), "--report",
                            str(tmp_path / "r.json"), "--quiet", "--device", "cpu", "--feature-layer", LAYER])
    assert code == 0
    written = json.loads((tmp_path / "r.json").read_text())
    assert written["metrics"]["fid"] == pytest.approx(full_report["metrics"]["fid"], rel=1e-9)
    assert json.loads(capsys.readouterr().out)["inputs"] == written["inputs"]


def test_the_report_copies_a_sample_npz_provenance(full_report, sets, random_weights, tmp_path, capsys):
    from dit_gspn.sampling.provenance import write_provenance

    samples = tmp_path / "samples.npz"
    write_npz(samples, sets["b"])
    write_provenance(samples, {"checkpoint_sha256": "ab" * 32, "sampler": "euler", "num_steps": 50}, len(sets["b"]))
    capsys.readouterr()
    assert evaluation_main([str(samples), str(sets["root"] / "a_stats.npz"), "--metrics", "fid", "--weights",
                            str(random_weights), "--feature-layer", LAYER, "--device", "cpu", "--quiet",
                            "--cache-dir", ""]) == 0
    report = json.loads(capsys.readouterr().out)
    provenance = report["inputs"][0]["provenance"]
    assert provenance["checkpoint_sha256"] == "ab" * 32 and provenance["count"] == N
    assert provenance["samples"] == "samples.npz" and "torch" in provenance["versions"]
    assert "provenance" not in report["inputs"][1]


def test_statistics_whose_sfid_features_have_another_width_are_one_error_naming_both_files(
        full_report, sets, random_weights, tmp_path, capsys):
    """A user's statistics file whose mu_s / sigma_s come from other spatial features than the samples' (ADM's
    2023 values an image): sFID cannot compare them, and says so in one line naming both files."""
    with np.load(sets["root"] / "a_stats.npz") as data:
        arrays = {k: data[k] for k in data.files}
    other = tmp_path / "other_stats.npz"
    np.savez(other, **dict(arrays, mu_s=np.zeros(5), sigma_s=np.eye(5)))
    proc = run_here(evaluation_main, [str(sets["root"] / "b.npz"), str(other), "--metrics", "sfid", "--weights",
                                      str(random_weights), "--feature-layer", LAYER, "--device", "cpu", "--quiet",
                                      "--cache-dir", ""], capsys)
    assert_one_line_error(proc, "the sFID statistics of", str(sets["root"] / "b.npz"), str(other),
                          "different feature widths (2023 and 5)")
