"""Smoke runs of the benchmark scripts (tiny sizes, CPU, seconds): they run end to end and write
the JSON fields the README's tables are made from. They measure nothing.

bench_scan.py's line_scan part has its own smoke test (tests/test_bench_scan.py); here its
gspn_scan part and bench_model.py."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import bench_scan

ROOT = Path(__file__).resolve().parents[1]


def test_bench_model_smoke_writes_results_and_plot(tmp_path):
    out, png = tmp_path / "bench_model.json", tmp_path / "bench_model.png"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_model.py"), "--smoke", "--device", "cpu",
         "--out", str(out), "--plot", str(png)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"bench_model.py failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    report = json.loads(out.read_text())
    assert report["device"]["device"] == "cpu" and report["smoke"] is True
    models = report["models"]
    assert {r["model"] for r in models} == {"GSPN-S/2", "DiT-S/2"}
    assert {r["resolution"] for r in models} == set(report["config"]["resolutions"])
    assert len(models) == 2 * len(report["config"]["resolutions"])
    for row in models:
        assert row["train_oom"] is False and row["sample_oom"] is False
        assert row["train_step_ms"] > 0 and row["sample_step_ms"] > 0
        assert row["latent"] == row["resolution"] // 8 and row["tokens"] == (row["latent"] // 2) ** 2
        assert "train_peak_mib" in row and "sample_peak_mib" in row
    assert isinstance(report["goals"], dict)
    assert len(report["mixer"]) == len(report["config"]["resolutions"])
    for row in report["mixer"]:
        assert row["fused_ms"] > 0 and row["composed_ms"] > 0
        assert row["speedup"] == pytest.approx(row["composed_ms"] / row["fused_ms"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_scan_smoke_times_every_gspn_scan_implementation(tmp_path):
    out = tmp_path / "bench_scan.json"
    bench_scan.main(["--smoke", "--device", "cpu", "--shapes", "1,4,6,5", "--repeat", "1", "--out", str(out)])
    results = json.loads(out.read_text())
    records = {r["impl"]: r for r in results["gspn_scan"]}
    assert set(records) == {"cpu", "composed", "reference"}
    for record in records.values():
        assert "error" not in record, record
        for phase in ("forward", "backward", "forward_backward"):
            assert record[phase]["median_ms"] > 0 and record[phase]["gbps"] > 0
            assert record[phase]["fraction_of_copy_bandwidth"] > 0


def test_bench_model_takes_each_time_as_the_median_over_rounds_and_evaluates_the_goals():
    from benchmarks import bench_model

    def row(model, res, train, sample):
        return {"model": model, "resolution": res, "train_step_ms": train, "sample_step_ms": sample}

    rounds = [[row("GSPN-S/2", 256, t, None), row("DiT-S/2", 256, d, None),
               row("GSPN-S/2", 1024, None, s), row("DiT-S/2", 1024, None, 3 * s)]
              for t, d, s in ((10.0, 12.0, 5.0), (30.0, 11.0, 7.0), (20.0, 50.0, 6.0))]
    merged = bench_model.median_over_rounds(rounds)
    assert [r["train_step_ms"] for r in merged[:2]] == [20.0, 12.0]
    assert merged[0]["train_step_ms_rounds"] == [10.0, 30.0, 20.0]
    assert merged[2]["sample_step_ms"] == 6.0 and merged[2]["train_step_ms"] is None
    goals = bench_model.goals(merged)
    assert goals["S2_train_256px"]["dit_over_gspn_time"] == pytest.approx(0.6)
    assert goals["S2_train_256px"]["met"] is False
    assert goals["S2_sample_1024px"]["dit_over_gspn_time"] == pytest.approx(3.0)
    assert goals["S2_sample_1024px"]["met"] is True
    assert "B2_train_256px" not in goals  # not measured
