"""The memory benchmark of batch sampling's assembly and the evaluator, at toy size: every job runs in its own
process and reports its own peak, and the streamed .npz is the in-memory one (the benchmark asserts it)."""
import json

import pytest


@pytest.mark.slow  # six processes that import torch: about a minute on 2 cores
def test_eval_memory_benchmark_smoke(tmp_path):
    from benchmarks import eval_memory

    out = tmp_path / "memory.json"
    report = eval_memory.main(["--sizes", "24", "--image-size", "16", "--shard-size", "8", "--reference-size", "12",
                               "--workdir", str(tmp_path / "work"), "--out", str(out)])
    assert json.loads(out.read_text()) == report
    jobs = [(r["job"], r["num_samples"]) for r in report["results"]]
    assert jobs == [("assemble", 12), ("imports", 0), ("assemble", 24), ("assemble_in_memory", 24), ("evaluate", 24)]
    for row in report["results"]:
        assert 50 < row["peak_rss_mb"] < 20_000
    evaluated = report["results"][-1]
    assert set(evaluated["metrics"]) >= {"fid", "sfid", "inception_score", "precision", "recall", "kid"}
    assert evaluated["features_mb"] == pytest.approx(24 * 2048 * 4 / 2**20, abs=0.05)
