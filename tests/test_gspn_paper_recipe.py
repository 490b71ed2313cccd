"""The GSPN authors' recipe as a preset (configs/gspn_paper_xl2_256.yaml) and the design comparison script
(benchmarks/compare_designs.py): the preset holds their settings, its learning rate is their schedule written out
from their train.py, it trains; the comparison matches parameter counts, gives each design its share of the time
budget, and scores as the demo's FID monitor does."""
import json
import math
from pathlib import Path

import pytest
import torch

from dit_gspn.training import load_config, train
from dit_gspn.training.config import parse_config
from dit_gspn.training.data_order import EpochBatchSampler
from dit_gspn.training.trainer import lr_factor

REPO = Path(__file__).resolve().parents[1]
PRESET = REPO / "configs" / "gspn_paper_xl2_256.yaml"
IMAGENET_TRAIN_IMAGES = 1_281_167


@pytest.fixture
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState, PartialState
    yield
    AcceleratorState._reset_state(True)
    PartialState._reset_state()


@pytest.fixture
def small_fid_classifier(monkeypatch):
    """The FID monitor's silhouette classifier trained on 10 shapes per class for one epoch (seconds, not ~20 s)."""
    from dit_gspn.training import fid_monitor

    monkeypatch.setattr(fid_monitor, "SHAPES_CLASSIFIER_PER_CLASS", 10)
    monkeypatch.setattr(fid_monitor, "SHAPES_CLASSIFIER_EPOCHS", 1)


def test_preset_holds_the_authors_settings():
    from dit_gspn.models import create_model

    config = parse_config(load_config(PRESET))
    model, train_, logging = config.model, config.train, config.logging
    assert model.name == "GSPN-paper-XL/2"
    assert {k: model.options[k] for k in ("class_dropout_prob", "drop_path", "directions", "chunk", "global_layers")} \
        == {"class_dropout_prob": 0.1, "drop_path": 0.1, "directions": "aligned", "chunk": 2, "global_layers": 2}
    assert (train_.global_batch_size, train_.lr, train_.weight_decay, train_.betas) == (1024, 1e-4, 0.0, (0.9, 0.999))
    assert (train_.grad_clip, train_.ema_decay, train_.mixed_precision, train_.steps) == (1.0, 0.9999, "bf16", 400_000)
    assert train_.objective == "ddpm" and model.options["learn_sigma"] is True
    assert (logging.sampler, logging.sample_steps, logging.cfg_scale) == ("ddpm", 250, 1.0)
    assert config.data.kind == "latents" and "mse" in config.data.options["path"]
    with torch.device("meta"):
        net = create_model(model.name, **model.options, in_channels=4, input_size=32, num_classes=1000)
    assert net.num_parameters() == 723_513_260
    assert net.last_drop_path.p == 0.1 and net.blocks[-1].drop_path.p == pytest.approx(0.1)
    assert net.blocks[0].drop_path.p == 0.0


def test_preset_epoch_is_their_loaders_length():
    """Their train.py: a DistributedSampler (each rank ceil(N / world) indices) and a DataLoader with drop_last at
    1024 // world per rank, so an epoch is 1251 steps at any world size that divides 1024; our data order counts
    the same for unflipped latents, and twice that with both orientations (the preset's flip: true)."""
    config = parse_config(load_config(PRESET))
    for world in (8, 64):
        theirs = math.ceil(IMAGENET_TRAIN_IMAGES / world) // (1024 // world)
        ours = EpochBatchSampler(IMAGENET_TRAIN_IMAGES, 1024 // world, world, 0, seed=0).batches_per_epoch
        assert theirs == ours == config.train.lr_update_every == 1251
        assert EpochBatchSampler(2 * IMAGENET_TRAIN_IMAGES, 1024 // world, world, 0, seed=0).batches_per_epoch == 2502
    assert config.train.warmup_steps == 5 * 1251 and config.train.lr_decay_steps == 1500 * 1251


def their_learning_rate(iteration: int, lr=1e-4, min_lr=1e-6, warmup_epochs=5, epochs=1500, per_epoch=1251) -> float:
    """adjust_learning_rate of their generation/train.py, called with the epoch of ``iteration``."""
    epoch = iteration // per_epoch
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup_epochs) / (epochs - warmup_epochs)))


def test_preset_learning_rate_is_their_schedule():
    """After the warm-up the preset's rate equals theirs at every step checked; in the warm-up it is theirs one epoch
    later (no epoch at lr 0), and it is held for each of their epochs."""
    train_ = parse_config(load_config(PRESET)).train
    ours = lambda step: train_.lr * lr_factor(train_)(step)  # noqa: E731
    for step in (6255, 6256, 7505, 7506, 50_000, 100_000, 200_123, 399_999, 1_000_000, 1_876_499):
        assert ours(step) == pytest.approx(their_learning_rate(step), rel=1e-12, abs=0), step
    for step in (0, 1, 1250, 1251, 2502, 5003, 6254):
        assert ours(step) == pytest.approx(their_learning_rate(step + 1251), rel=1e-12), step
    assert their_learning_rate(0) == 0.0 and ours(0) == pytest.approx(2e-5)
    assert ours(1251 * 300) == ours(1251 * 301 - 1) != ours(1251 * 301)
    assert ours(1_876_500 + 5) == pytest.approx(1e-6)  # the floor, past their 1500 epochs


def test_preset_trains_two_steps(tmp_path, fresh_accelerate_state):
    """The preset with tiny overrides (shapes at 16 px, depth 2, width 32, batch 4, CPU, fp32) takes 2 steps at its
    schedule's first rate (1e-4 / 5: the first warm-up epoch), with drop path on."""
    config = load_config(PRESET, ["model.hidden_size=32", "model.depth=2", "train.steps=2", "train.global_batch_size=4",
                                  "train.cpu=true", "train.mixed_precision='no'", "logging.tensorboard=false",
                                  "logging.sample_steps=2", "checkpoint.every=2", f"run_dir={tmp_path / 'run'}"])
    config["data"] = {"kind": "shapes", "num_per_class": 2, "image_size": 16, "num_workers": 0}
    result = train(config)
    assert result.step == 2 and math.isfinite(result.loss)
    assert result.model.last_drop_path.p == 0.1 and result.model.blocks[-1].drop_path.p == pytest.approx(0.1)
    scheduler = json.loads((result.checkpoint / "lr_scheduler.json").read_text())
    assert scheduler["_last_lr"] == [pytest.approx(1e-4 / 5, rel=1e-12)]
    saved = (result.checkpoint / "config.yaml").read_text()
    assert "lr_schedule: cosine" in saved and "lr_update_every: 1251" in saved


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
        assert 0 <= r["shape_accuracy"] <= 1 and 0 <= r["accuracy"] <= 1 and math.isfinite(r["fid"])
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
    config = design_config(base, DESIGNS["DiT (attention)"], seed=0, steps=1, run_dir=tmp_path / "run")
    fid_files = build_training_data(parse_config(config)).fid_features(tmp_path / "fid")
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
