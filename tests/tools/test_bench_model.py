"""benchmarks/bench_model.py: a smoke run (tiny sizes, CPU, seconds) that writes the JSON fields the results tables
are made from and its plot, the goals computed from the rows, and an unknown size named in one line."""
import json
import os
import subprocess
import sys

import pytest

from helpers.repo import REPO


def test_bench_model_smoke_writes_results_and_plot(tmp_path):
    from benchmarks import bench_model

    out, png = tmp_path / "bench_model.json", tmp_path / "bench_model.png"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_model", "--smoke", "--device", "cpu",
         "--out", str(out), "--plot", str(png)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"bench_model.py failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    report = json.loads(out.read_text())
    assert report["device"]["device"] == "cpu" and report["smoke"] is True
    models = report["models"]
    assert {r["model"] for r in models} == {"GSPN-S/2", "DiT-S/2"}
    assert {r["resolution"] for r in models} == set(report["config"]["resolutions"])
    assert len(models) == 2 * len(report["config"]["resolutions"])
    assert report["config"]["interleave"] is True  # the CPU default: GSPN's and DiT's steps alternate
    for row in models:
        assert row["train_oom"] is False and row["sample_oom"] is False
        assert row["train_step_ms"] > 0 and row["sample_step_ms"] > 0
        assert row["latent"] == row["resolution"] // 8 and row["tokens"] == (row["latent"] // 2) ** 2
        assert row["train_peak_mib"] is None and row["sample_peak_mib"] is None  # torch tracks no CPU peak
    assert report["goals"] == bench_model.goals(models)  # the goals are those the measured rows give
    assert len(report["mixer"]) == len(report["config"]["resolutions"])
    for row in report["mixer"]:
        assert row["speedup"] == pytest.approx(row["composed_ms"] / row["fused_ms"], rel=1e-12)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_model_goals_are_dits_time_over_gspns_where_both_were_measured():
    from benchmarks import bench_model

    rows = [{"model": "GSPN-S/2", "resolution": 256, "train_step_ms": 20.0},
            {"model": "DiT-S/2", "resolution": 256, "train_step_ms": 12.0},
            {"model": "GSPN-S/2", "resolution": 1024, "sample_step_ms": 6.0},
            {"model": "DiT-S/2", "resolution": 1024, "sample_step_ms": 18.0},
            {"model": "GSPN-B/2", "resolution": 256, "train_step_ms": 5.0}]
    goals = bench_model.goals(rows)
    assert goals["S2_train_256px"]["dit_over_gspn_time"] == pytest.approx(0.6)
    assert goals["S2_train_256px"]["met"] is False
    assert goals["S2_sample_1024px"]["dit_over_gspn_time"] == pytest.approx(3.0)
    assert goals["S2_sample_1024px"]["met"] is True
    assert set(goals) == {"S2_train_256px", "S2_sample_1024px"}  # B/2 lacks its DiT twin


def test_bench_model_names_an_unknown_size_in_one_line(capsys):
    from benchmarks import bench_model

    with pytest.raises(SystemExit) as exit_info:
        bench_model.parse_args(["--device", "cpu", "--out", "unused.json", "--sizes", "S/2", "Q/9"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "unknown size Q/9" in err and "S/2" in err.splitlines()[-1] and "Traceback" not in err
