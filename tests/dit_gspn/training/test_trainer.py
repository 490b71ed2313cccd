"""dit_gspn.training.trainer, runs in this process: checkpoints that sample.py reads, flow matching, a non-finite
stop, latent shards, gradient checkpointing and bf16, resumes, and the learning-rate schedules against their
formulas. tests/integration/test_training.py kills and resumes real processes and runs two-process DDP."""
import math
import os
from pathlib import Path

import pytest
import torch

from dit_gspn.errors import UserError
from dit_gspn.training import ConfigError, NonFiniteLossError, list_checkpoints, load_config, train

from helpers.entry_points import load_script
from helpers.repo import REPO
from helpers.training import tiny_config


def test_checkpoints_are_read_by_sampling_and_pruned(tmp_path, fresh_accelerate_state):
    from dit_gspn.sampling.model_loader import load_model

    result = train(tiny_config(tmp_path / "run", logging={"sample_every": 3}))
    names = [p.name for p in list_checkpoints(tmp_path / "run")]
    assert names == ["0000004", "0000006"] and result.checkpoint.name == "0000006"
    ckpt = result.checkpoint
    assert {p.name for p in ckpt.iterdir()} >= {"model", "ema", "sampling.json", "config.yaml", "optimizer.pt",
                                                "lr_scheduler.json", "trainer_state.json", "rng"}
    assert [p.name for p in (ckpt / "rng").iterdir()] == ["rank0.safetensors"]  # no pickles in a checkpoint
    model, info = load_model(ckpt, weights="ema")
    assert info.vae is None and info.latent_scale == 1.0 and info.image_size == (16, 16)
    assert info.num_classes == 10 and info.class_names[2] == "blue triangle"
    for name, value in result.ema.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
    assert not torch.equal(result.ema.state_dict()["final_layer.linear.weight"],
                           result.model.state_dict()["final_layer.linear.weight"])
    assert (tmp_path / "run" / "samples" / "0000003.png").is_file() and result.grid.name == "0000006.png"
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        train(tiny_config(tmp_path / "run"))


def test_flow_matching_run_writes_a_checkpoint_that_samples_with_its_own_sampler(tmp_path, fresh_accelerate_state):
    from dit_gspn.sampling.model_loader import load_model

    run = tmp_path / "run"
    result = train(tiny_config(run, train={"objective": "flow", "objective_kwargs": {"timestep_sampling": "logit_normal"}}))
    model, info = load_model(result.checkpoint)
    assert info.objective == "flow" and not model.learn_sigma and model.out_channels == 3
    assert math.isfinite(result.loss) and result.grid.is_file()
    sample_py = load_script("sample")
    args = ["--ckpt", str(result.checkpoint), "--num-steps", "3", "--classes", "1", "--cpu"]
    assert sample_py.main([*args, "--out", str(tmp_path / "grid.png")]) == 0  # euler, the flow default
    assert (tmp_path / "grid.png").is_file()
    with pytest.raises(UserError, match="sampler 'ddpm' does not fit a model trained with the 'flow' objective"):
        sample_py.main([*args, "--sampler", "ddpm", "--out", str(tmp_path / "no.png")])


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, fresh_accelerate_state):
    from dit_gspn.diffusion import GaussianDiffusion

    calls = {"n": 0}
    real = GaussianDiffusion.training_losses

    def poisoned(self, *args, **kwargs):
        calls["n"] += 1
        out = real(self, *args, **kwargs)
        if calls["n"] > 4:  # micro-batch 5 = the first half of step 3
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(GaussianDiffusion, "training_losses", poisoned)
    run = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match=r"nan at step 3 .*last good checkpoint: .*0000002"):
        train(tiny_config(run))
    assert [p.name for p in list_checkpoints(run)] == ["0000002"]
    assert not any(p.name.startswith(".tmp") for p in (run / "checkpoints").iterdir())


def test_training_on_latent_shards_decodes_grids_through_the_vae(tmp_path, fresh_accelerate_state):
    from diffusers import AutoencoderKL

    from dit_gspn.data.latent_shards import shard_name, write_index, write_shard
    from dit_gspn.checkpoint import SamplingInfo

    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
                        norm_num_groups=8, sample_size=16)
    vae.save_pretrained(tmp_path / "vae")
    root = tmp_path / "latents"
    root.mkdir()
    shards = []
    for k in range(2):
        n = 6
        latents = torch.randn(n, 4, 8, 8)
        write_shard(root / shard_name(k), {"latents": latents, "latents_flipped": latents.flip(-1),
                                           "labels": torch.randint(0, 3, (n,))}, {"count": n, "skipped": []})
        shards.append({"file": shard_name(k), "count": n, "skipped": []})
    write_index(root, {"vae": str(tmp_path / "vae"), "latent_scale": 0.18215, "image_size": [16, 16],
                       "latent_shape": [4, 8, 8], "num_classes": 3, "class_names": ["a", "b", "c"],
                       "flipped": True, "shards": shards})
    config = tiny_config(tmp_path / "run", data={"kind": "latents", "path": str(root)}, train={"steps": 2},
                         logging={"sample_classes": None})
    result = train(config)
    info = SamplingInfo.read(result.checkpoint / "sampling.json")
    assert info.vae == str(tmp_path / "vae") and info.latent_scale == 0.18215 and info.image_size == (16, 16)
    assert info.class_names == ["a", "b", "c"] and result.model.in_channels == 4
    from PIL import Image
    assert Image.open(result.grid).size[0] >= 3 * 16  # decoded 16x16 images, one column per class
    with pytest.raises(ConfigError, match=r"model.input_size=16 but the data is 8 \(the size of the latents maps\)"):
        train(tiny_config(tmp_path / "run2", data={"kind": "latents", "path": str(root)},
                          model={"input_size": 16}))


def test_gradient_checkpointing_matches_and_bf16_trains(tmp_path, fresh_accelerate_state):
    from accelerate.state import AcceleratorState, PartialState

    def run(name, **train_options):
        result = train(tiny_config(tmp_path / name, train={"steps": 2, **train_options}))
        AcceleratorState._reset_state(True)
        PartialState._reset_state()
        return result

    plain = run("plain")
    recomputed = run("ckpt", gradient_checkpointing=True)
    for name, value in plain.model.state_dict().items():
        torch.testing.assert_close(recomputed.model.state_dict()[name], value, rtol=1e-5, atol=1e-6, msg=name)
    bf16 = run("bf16", mixed_precision="bf16")
    assert torch.isfinite(torch.tensor(bf16.loss))
    assert not torch.equal(bf16.model.state_dict()["final_layer.linear.weight"],
                           plain.model.state_dict()["final_layer.linear.weight"])


def _train_py_main():
    return load_script("train").main


def _logged_steps(folder: Path, tag: str) -> list[int]:
    """Every step of ``tag`` in the run's TensorBoard event files, as TensorBoard reads them (purges applied)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), purge_orphaned_data=True)
    events.Reload()
    return [e.step for e in events.Scalars(tag)]


def test_resume_from_an_earlier_checkpoint_uses_its_config_and_purges_abandoned_tensorboard_steps(
        tmp_path, fresh_accelerate_state, capsys):
    run = tmp_path / "run"
    train(tiny_config(run, logging={"tensorboard": True}, checkpoint={"every": 2, "keep_last": 3}))
    assert _logged_steps(run / "tensorboard", "train/loss") == [1, 2, 3, 4, 5, 6]
    from accelerate.state import AcceleratorState, PartialState
    AcceleratorState._reset_state(True)
    PartialState._reset_state()
    # The demo preset is another model: were it the base, the resume would be refused as a changed config.
    assert _train_py_main()(["--config", str(REPO / "configs" / "demo.yaml"), "--resume",
                             str(run / "checkpoints" / "0000002"), "train.steps=5"]) == 0
    captured = capsys.readouterr()
    assert "config.yaml is the base config" in captured.err and "trained to step 5" in captured.out
    assert _logged_steps(run / "tensorboard", "train/loss") == [1, 2, 3, 4, 5]


def test_a_checkpoint_from_before_per_index_seeds_resumes_with_a_note(tmp_path, fresh_accelerate_state, capsys):
    import json

    from accelerate.state import AcceleratorState, PartialState

    run = tmp_path / "run"
    train(tiny_config(run, train={"steps": 2}))
    state_file = run / "checkpoints" / "0000002" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    assert state.pop("seeding") == "seed_sequence"
    state_file.write_text(json.dumps(state))  # as the runs before seeding.py wrote it
    AcceleratorState._reset_state(True)
    PartialState._reset_state()
    capsys.readouterr()
    assert train(tiny_config(run, train={"steps": 4}), resume="latest").step == 4
    assert "written before per-index seeds: the data order from here on" in capsys.readouterr().out
    AcceleratorState._reset_state(True)
    PartialState._reset_state()
    train(tiny_config(run, train={"steps": 6}), resume="latest")  # a checkpoint of this code: no note
    assert "per-index seeds" not in capsys.readouterr().out


def test_presets_grid_classes_follow_the_models_class_count(monkeypatch, tmp_path):
    from dit_gspn.sampling.labelled_grid import IMAGENET_GRID_CLASSES
    from dit_gspn.training.sample_grids import grid_labels
    from dit_gspn.training.trainer import set_compile_cache

    preset = load_config(REPO / "configs" / "gspn_xl2_256.yaml")
    assert grid_labels(1000, preset["logging"]["sample_classes"], 1) == (IMAGENET_GRID_CLASSES, 8)
    assert grid_labels(10, preset["logging"]["sample_classes"], 2) == (list(range(10)) * 2, 10)
    assert grid_labels(3, preset["logging"]["sample_classes"], 1) == ([0, 1, 2], 3)

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert set_compile_cache() == tmp_path / ".cache" / "dit_gspn" / "inductor"
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / ".cache" / "dit_gspn" / "inductor")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert set_compile_cache() == tmp_path / "mine"


def test_learning_rate_schedules_against_their_formulas():
    """Constant after warm-up (DiT's with warm-up), diffusers' cosine after warm-up, and a per-epoch cosine as the
    GSPN authors' recipe meant it (warm-up epochs at (e + 1) / W, then a cosine over the epochs to min_lr)."""
    import math

    from diffusers.optimization import get_cosine_schedule_with_warmup

    from dit_gspn.training.config import TrainConfig
    from dit_gspn.training.trainer import lr_factor

    constant = lr_factor(TrainConfig(steps=100, warmup_steps=10))
    assert [constant(s) for s in (0, 4, 9, 10, 99)] == [0.1, 0.5, 1.0, 1.0, 1.0]
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    diffusers_cosine = get_cosine_schedule_with_warmup(optimizer, 10, 100).lr_lambdas[0]
    ours = lr_factor(TrainConfig(steps=100, warmup_steps=10, lr_schedule="cosine"))
    for step in range(10, 100):
        assert ours(step) == pytest.approx(diffusers_cosine(step), abs=1e-12), step
    epoch, warmup_epochs, epochs, lr, min_lr = 7, 5, 40, 1e-4, 1e-6
    per_epoch = lr_factor(TrainConfig(steps=epochs * epoch, lr=lr, min_lr=min_lr, warmup_steps=warmup_epochs * epoch,
                                      lr_schedule="cosine", lr_update_every=epoch))
    for step in range(epochs * epoch):
        e = step // epoch
        expected = (lr * (e + 1) / warmup_epochs if e < warmup_epochs else
                    min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * (e - warmup_epochs) / (epochs - warmup_epochs))))
        assert lr * per_epoch(step) == pytest.approx(expected, rel=1e-12), step
