"""benchmarks/demo_quality.py: the silhouette that keeps a shape and drops its colour, a smoke run that writes
its JSON, and the summary's mean and spread over seeds."""
import json

import pytest

from helpers.training import TOY_DEMO


def _demo_quality():
    from benchmarks import demo_quality

    return demo_quality


def test_silhouette_keeps_the_shape_and_drops_the_colour():
    """A two-colour image becomes exactly its mask, whatever the two colours are."""
    import torch

    torch.manual_seed(0)
    mask = (torch.rand(4, 1, 16, 16) < 0.4).float()
    mask[:, :, 0, 0], mask[:, :, 0, 1] = 0, 1  # both levels present in every image
    for fg, bg in [((0.9, -0.8, -0.8), (-0.9, -0.9, -0.7)), ((-0.6, 0.2, 0.95), (-1.0, -0.95, -1.0))]:
        images = mask * torch.tensor(fg).view(1, 3, 1, 1) + (1 - mask) * torch.tensor(bg).view(1, 3, 1, 1)
        out = _demo_quality().silhouette(images)
        assert out.shape == images.shape
        torch.testing.assert_close(out, mask.expand(-1, 3, -1, -1), atol=1e-6, rtol=0)


def test_demo_quality_benchmark_smoke(tmp_path, fresh_accelerate_state):
    bench = _demo_quality()
    out = tmp_path / "q.json"
    report = bench.main(["--samples-per-class", "1", "--classifier-per-class", "4", "--classifier-epochs", "1",
                         "--sample-steps", "2", "--runs", str(tmp_path / "runs"), "--out", str(out),
                         *[o for o in TOY_DEMO if not o.startswith("logging.")], "train.steps=1"])
    assert json.loads(out.read_text()) == report
    assert [r["model"] for r in report["results"]] == ["GSPN-S/4", "DiT-S/4,model.mixer_kwargs=null"]
    for r in report["results"]:
        assert r["num_samples"] == 10
        for key in ("accuracy", "shape_accuracy"):
            # one sample of each of the 10 classes: each class is right or wrong, the accuracy their mean
            per_class = r[f"per_class_{key}"]
            assert len(per_class) == 10 and set(per_class) <= {0.0, 1.0}, per_class
            assert r[key] == pytest.approx(sum(per_class) / 10, abs=1e-4)
    rescored = bench.main(["--samples-per-class", "1", "--classifier-per-class", "4", "--classifier-epochs", "1",
                           "--sample-steps", "2", "--out", str(tmp_path / "q2.json"),
                           "--checkpoints", report["results"][0]["checkpoint"]])
    assert rescored["results"][0]["train_steps"] == 1 and rescored["results"][0]["num_samples"] == 10


def test_demo_quality_summary_gives_each_models_mean_and_spread_over_seeds():
    results = [{"model": "A", "seed": s, "accuracy": a, "shape_accuracy": b, "final_loss": 0.1, "train_steps": 5}
               for s, a, b in ((0, 0.5, 0.2), (1, 0.7, 0.4), (2, 0.9, 0.9))]
    results.append({"model": "B", "seed": 0, "accuracy": 1.0, "shape_accuracy": 0.6, "final_loss": 0.2, "train_steps": 5})
    summary = _demo_quality().summarize(results)
    assert summary["A"]["runs"] == 3 and summary["B"]["runs"] == 1
    assert summary["A"]["accuracy_mean"] == pytest.approx(0.7)
    assert summary["A"]["accuracy_std"] == pytest.approx(0.2)  # sample standard deviation of 0.5, 0.7, 0.9
    assert summary["A"]["shape_accuracy_mean"] == pytest.approx(0.5)
    assert summary["B"]["shape_accuracy_std"] == 0.0
