"""The GSPN authors' recipe as a preset (configs/gspn_paper_xl2_256.yaml): it holds their settings, its epoch is
their loader's length, its learning rate is their schedule written out from their train.py, and it trains."""
import json
import math

import pytest
import torch

from dit_gspn.training import load_config, train
from dit_gspn.training.config import parse_config
from dit_gspn.training.data_order import EpochBatchSampler
from dit_gspn.training.trainer import lr_factor

from helpers.repo import REPO


PRESET = REPO / "configs" / "gspn_paper_xl2_256.yaml"
IMAGENET_TRAIN_IMAGES = 1_281_167


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
