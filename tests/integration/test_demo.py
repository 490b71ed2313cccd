"""The built-in demo end to end at toy size (the real one is timed by hand: see the README), the demo
config's promises, and a smoke run of the demo-quality benchmark."""
import json
from pathlib import Path

import pytest
from PIL import Image

from dit_gspn.commands import demo
from dit_gspn.training import load_config
from helpers.repo import REPO

TOY = ["model.hidden_size=32", "model.depth=1", "model.num_heads=2", "data.num_per_class=4",
       "train.global_batch_size=8", "train.steps=2", "logging.sample_steps=2", "logging.samples_per_class=1"]


def test_demo_config_trains_gspn_in_pixel_space_within_the_time_budget():
    config = load_config(demo.DEMO_CONFIG)
    assert config["model"]["name"].startswith("GSPN-")
    assert config["data"]["kind"] == "shapes" and config["train"]["cpu"] is True
    # 5 minutes in all on 2 cores: imports, training capped at 4 minutes (the CPU kernel build, ~30 s on a
    # fresh machine, happens inside it), then the grid (~15 s).
    assert config["train"]["time_limit_minutes"] is not None and config["train"]["time_limit_minutes"] <= 4.0


def test_demo_writes_a_checkpoint_and_a_labelled_grid_and_says_where(tmp_path, capsys, fresh_accelerate_state):
    assert demo.main(["--out", str(tmp_path / "run"), *TOY]) == 0
    printed = capsys.readouterr().out
    ckpt = tmp_path / "run" / "checkpoints" / "0000002"
    grid = tmp_path / "run" / "samples" / "0000002.png"
    assert str(ckpt) in printed and str(grid) in printed
    assert (ckpt / "ema" / "config.json").is_file() and (ckpt / "sampling.json").is_file()
    width, height = Image.open(grid).size
    assert width >= 10 * 32 and width > 3 * height  # 10 class columns, one labelled sample each


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
                         *[o for o in TOY if not o.startswith("logging.")], "train.steps=1"])
    assert json.loads(out.read_text()) == report
    assert [r["model"] for r in report["results"]] == ["GSPN-S/4", "DiT-S/4,model.mixer_kwargs=null"]
    for r in report["results"]:
        assert 0 <= r["accuracy"] <= 1 and r["num_samples"] == 10 and len(r["per_class_accuracy"]) == 10
        assert 0 <= r["shape_accuracy"] <= 1 and len(r["per_class_shape_accuracy"]) == 10
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
