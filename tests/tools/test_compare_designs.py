"""benchmarks/compare_designs.py: the designs match parameter counts, each gets its share of the time budget, the
FID is scored as the demo's FID monitor does, a scored run is read back, and the summary's statistics."""
import json
import math

import pytest
import torch

from dit_gspn.training import load_config
from dit_gspn.training.config import parse_config

from helpers.repo import REPO


@pytest.fixture
def small_fid_classifier(monkeypatch):
    """The FID monitor's silhouette classifier trained on 10 shapes per class for one epoch (seconds, not ~20 s)."""
    from dit_gspn.training import fid_monitor

    monkeypatch.setattr(fid_monitor, "SHAPES_CLASSIFIER_PER_CLASS", 10)
    monkeypatch.setattr(fid_monitor, "SHAPES_CLASSIFIER_EPOCHS", 1)


# --- The design comparison ----------------------------------------------------------------------------------

def demo_base(*overrides) -> dict:
    from benchmarks.compare_designs import RUN_OVERRIDES

    base = load_config(REPO / "configs" / "demo.yaml", [*RUN_OVERRIDES, *overrides])
    base["model"] = {}
    return base


def test_designs_match_parameter_counts_within_three_percent():
    from benchmarks.compare_designs import DESIGNS, parameter_counts
    from dit_gspn.models import create_model

    counts = parameter_counts(demo_base("data.num_per_class=2"), DESIGNS)
    assert list(counts) == list(DESIGNS) and len(counts) == 4
    first = counts["GSPN-DiT (ours)"]
    assert all(abs(count / first - 1) <= 0.03 for count in counts.values())
    with torch.device("meta"):
        paper = create_model("GSPN-paper-S/4", hidden_size=100, depth=10, in_channels=3, input_size=32,
                             num_classes=10, learn_sigma=False)
    assert counts["GSPN-paper, aligned"] == sum(p.numel() for p in paper.parameters())
    wider = {**DESIGNS, "wide": {"name": "GSPN-paper-S/4", "hidden_size": 128, "depth": 10}}
    with pytest.raises(ValueError, match="wide has .* from 734,736"):
        parameter_counts(demo_base("data.num_per_class=2"), wider)


def test_equal_time_steps_share_the_budget():
    from benchmarks.compare_designs import equal_time_steps

    assert equal_time_steps({"a": 0.5, "b": 0.2, "c": 3.0, "d": 100.0}, 30.0) == {"a": 60, "b": 150, "c": 10, "d": 1}


def test_fid_of_the_training_images_is_zero(tmp_path, small_fid_classifier):
    """The comparison's FID of the training images themselves against their own statistics (the demo's FID monitor's
    extractor and reference) is 0: images enter in the layout and range the reference was made from."""
    from benchmarks.compare_designs import fid_against_training_images
    from dit_gspn.training.datasets import build_training_data

    config = parse_config({"run_dir": str(tmp_path), "model": {"name": "GSPN-S/4"},
                           "data": {"kind": "shapes", "num_per_class": 8, "image_size": 16, "flip": False,
                                    "num_workers": 0}})
    data = build_training_data(config)
    images, labels = zip(*(data.dataset[i] for i in range(len(data.dataset))))
    files = data.fid_features(tmp_path / "fid")
    same = fid_against_training_images(torch.stack(images), torch.tensor(labels), files, tmp_path)
    noise = fid_against_training_images(torch.rand(80, 3, 16, 16) * 2 - 1, torch.tensor(labels), files, tmp_path)
    assert abs(same) < 1e-6 * noise and noise > 0


def test_compare_designs_smoke(tmp_path, small_fid_classifier, fresh_accelerate_state):
    """Two steps per design at 16 px, one seed: every design and setting scored, the equal-time steps are the budget
    over each design's measured step time, and a run that both settings share is trained once."""
    from benchmarks.compare_designs import DESIGNS, main

    out = tmp_path / "compare.json"
    report = main(["--seeds", "0", "--steps", "2", "--timing-rounds", "2", "--timing-warmup", "0",
                   "--samples-per-class", "1", "--sample-steps", "2", "--classifier-per-class", "10",
                   "--classifier-epochs", "1", "--runs", str(tmp_path / "runs"), "--out", str(out),
                   "data.num_per_class=4", "data.image_size=16", "train.global_batch_size=4",
                   "logging.sample_steps=2"])
    assert json.loads(out.read_text())["steps"] == report["steps"]
    results = report["results"]
    assert [(r["setting"], r["design"]) for r in results] == [(s, d) for s in ("equal_steps", "equal_time")
                                                              for d in DESIGNS]
    seconds = report["step_seconds"]
    first = next(iter(DESIGNS))
    assert report["budget_seconds"] == pytest.approx(2 * seconds[first], abs=2e-6)  # both rounded to 6 decimals
    for r in results:
        want = 2 if r["setting"] == "equal_steps" else max(1, round(report["budget_seconds"] / seconds[r["design"]]))
        assert r["steps"] == want, r
        assert r["steps"] == report["steps"][r["setting"]][r["design"]]
        assert math.isfinite(r["fid"]) and r["num_samples"] == 10
        for key in ("accuracy", "shape_accuracy"):
            # one sample of each of the 10 classes: each class is right or wrong, the accuracy their mean
            per_class = r[f"per_class_{key}"]
            assert len(per_class) == 10 and set(per_class) <= {0.0, 1.0}, per_class
            assert r[key] == pytest.approx(sum(per_class) / 10, abs=1e-4)
    runs = {(r["design"], r["steps"]): r["run_dir"] for r in results}
    assert report["training_runs"] == len(runs) == len(set(runs.values()))
    assert sum(1 for r in results if r["run_dir"] == runs[(first, 2)]) == 2  # trained once, used by both settings
    for name in DESIGNS:
        assert f"| {name} |" in report["markdown"]


def test_a_scored_run_is_read_back_not_trained_again(tmp_path, monkeypatch, small_fid_classifier,
                                                     fresh_accelerate_state):
    """A run asked for again with the same config and scoring returns its kept score without training; other scoring
    settings train (here: reach the training call) again."""
    import dit_gspn.training
    from benchmarks.compare_designs import DESIGNS, design_config, train_and_score
    from dit_gspn.training.datasets import build_training_data

    base = demo_base("data.num_per_class=4", "data.image_size=16", "train.global_batch_size=4",
                     "logging.sample_steps=2")
    run_config = design_config(base, DESIGNS["DiT (attention)"], seed=0, steps=1, run_dir=tmp_path / "run")
    fid_files = build_training_data(run_config).fid_features(tmp_path / "fid")
    config = run_config.to_dict()
    scoring = {"samples_per_class": 1, "sample_steps": 2}
    score = train_and_score(config, {}, fid_files, scoring)
    assert score["steps"] == 1 and math.isfinite(score["fid"]) and math.isfinite(score["final_loss"])

    def no_training(*args, **kwargs):
        raise AssertionError("trained again")

    monkeypatch.setattr(dit_gspn.training, "train", no_training)
    assert train_and_score(config, {}, fid_files, dict(scoring)) == score
    with pytest.raises(AssertionError, match="trained again"):
        train_and_score(config, {}, fid_files, {**scoring, "samples_per_class": 2})


def test_compare_designs_refuses_an_unknown_design_and_model_overrides(capsys):
    from benchmarks.compare_designs import main

    for argv, named in ((["--designs", "GSPN-DiT (ours)", "Mamba"], "'Mamba' is not one of 'GSPN-DiT (ours)'"),
                        (["model.depth=3"], "model.* overrides do not apply")):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2 and named in capsys.readouterr().err


def test_summary_means_spreads_and_welch_p_values():
    """Mean and sample standard deviation over seeds, the best design per score, and Welch's p-value against it: with
    one constant group of 3 the test has 2 degrees of freedom, whose two-sided p is 1 - |t| / sqrt(t^2 + 2)."""
    from benchmarks.compare_designs import summarize

    def run(design, seed, shape, fid):
        return {"setting": "equal_steps", "design": design, "seed": seed, "shape_accuracy": shape, "accuracy": 1.0,
                "fid": fid, "final_loss": 0.2, "steps": 10}

    results = [run("x", s, 0.1, f) for s, f in enumerate((50.0, 60.0, 70.0))]
    results += [run("y", s, a, f) for s, (a, f) in enumerate(((0.3, 40.0), (0.35, 50.0), (0.4, 60.0)))]
    summary = summarize(results)["equal_steps"]
    x, y = summary["designs"]["x"], summary["designs"]["y"]
    assert (y["shape_accuracy_mean"], y["shape_accuracy_std"]) == (pytest.approx(0.35), pytest.approx(0.05))
    assert (x["fid_mean"], x["fid_std"]) == (60.0, 10.0)
    assert summary["best_shape_accuracy"] == "y" and summary["best_fid"] == "y"
    t = 0.25 / (0.05 / math.sqrt(3))
    assert x["shape_accuracy_p_vs_best"] == pytest.approx(1 - t / math.sqrt(t * t + 2), abs=1e-4)
    assert y["shape_accuracy_p_vs_best"] is None
