"""Training: config overrides, the data order, checkpoints that sample.py reads, a non-finite stop,
a real SIGKILL-and-resume that must end bitwise equal to an uninterrupted run, and 2-process DDP."""
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from helpers.entry_points import load_script
from dit_gspn.errors import UserError
from dit_gspn.training import ConfigError, NonFiniteLossError, list_checkpoints, load_config, train
from dit_gspn.training.data_order import EpochBatchSampler
from helpers.repo import REPO
from helpers.training import tiny_config, write_config



def test_config_overrides_and_typos(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  steps: 5\n  weight_decay: 1e-2\nmodel:\n  name: DiT-S/2\n  depth: 3\n")
    config = load_config(path, ["train.lr=3e-4", "model.hidden_size=64", "train.betas=[0.9, 0.95]"])
    assert config["train"]["steps"] == 5 and config["train"]["lr"] == 3e-4 and config["train"]["betas"] == [0.9, 0.95]
    assert config["model"] == {"name": "DiT-S/2", "depth": 3, "hidden_size": 64}
    assert config["train"]["ema_decay"] == 0.9999  # DiT's default survives
    assert config["train"]["weight_decay"] == 0.01  # YAML 1.1 would read 1e-2 as a string
    with pytest.raises(ConfigError, match="train.stpes.*did you mean steps"):
        load_config(path, ["train.stpes=3"])
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(path, ["train.steps"])


def test_data_order_splits_ranks_and_resumes_mid_epoch():
    full = [EpochBatchSampler(50, 4, 2, r, seed=1, epoch=3) for r in (0, 1)]
    batches = [list(s) for s in full]
    assert len(batches[0]) == 6  # 50 // 8
    flat = [i for b0, b1 in zip(*batches) for i in b0 + b1]
    assert len(set(flat)) == 48 and all(0 <= i < 50 for i in flat)
    assert list(EpochBatchSampler(50, 4, 2, 1, seed=1, epoch=3, start=4)) == batches[1][4:]
    assert list(EpochBatchSampler(50, 4, 2, 1, seed=1, epoch=4)) != batches[1]
    # One process with the same global micro-batch reads the same samples in the same order.
    single = list(EpochBatchSampler(50, 8, 1, 0, seed=1, epoch=3))
    assert single == [b0 + b1 for b0, b1 in zip(*batches)]


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


def test_objective_settings_are_checked_before_training(tmp_path):
    from dit_gspn.training.config import parse_config

    def resolved(*overrides):
        return parse_config(load_config(None, list(overrides))).to_dict()

    ddpm, flow = resolved(), resolved("train.objective=flow")
    assert (ddpm["model"]["learn_sigma"], ddpm["logging"]["sampler"]) == (True, "ddpm")
    assert (flow["model"]["learn_sigma"], flow["logging"]["sampler"]) == (False, "euler")
    with pytest.raises(ConfigError, match="train.objective must be one of"):
        resolved("train.objective=edm")
    with pytest.raises(ConfigError, match="unknown key 'train.objective_kwargs.snr_gamma'; the flow objective takes"):
        resolved("train.objective=flow", "train.objective_kwargs.snr_gamma=5")
    with pytest.raises(ConfigError, match="model.learn_sigma=True does not fit train.objective=flow"):
        resolved("train.objective=flow", "model.learn_sigma=true")
    with pytest.raises(ConfigError, match="logging.sampler: sampler 'ddpm' does not fit.*'flow'"):
        resolved("train.objective=flow", "logging.sampler=ddpm")
    with pytest.raises(ConfigError, match="logging.sampler: sampler 'heun' does not fit.*'ddpm'"):
        resolved("logging.sampler=heun")
    with pytest.raises(ConfigError, match="logging.sample_steps: DDIM cannot take exactly 60 steps.*59 or 63"):
        resolved("logging.sampler=ddim", "logging.sample_steps=60")
    with pytest.raises(ConfigError, match="train.objective_kwargs: timestep_sampling must be one of"):
        resolved("train.objective=flow", "train.objective_kwargs.timestep_sampling=cosine")


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


def _train_cmd(config_path: Path, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "train.py"), "--config", str(config_path), *extra]


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _final_tensors(ckpt: Path) -> dict:
    out = {f"model.{k}": v for k, v in load_file(ckpt / "model" / "diffusion_pytorch_model.safetensors").items()}
    out.update({f"ema.{k}": v for k, v in load_file(ckpt / "ema" / "diffusion_pytorch_model.safetensors").items()})
    opt = torch.load(ckpt / "optimizer.pt", weights_only=True)
    for idx, state in opt["state"].items():
        for key, value in state.items():
            out[f"opt.{idx}.{key}"] = value
    return out


def test_sigkill_and_resume_is_bitwise_equal_to_an_uninterrupted_run(tmp_path):
    steps = 24
    sections = dict(train={"steps": steps, "warmup_steps": 5},
                    model={"name": "GSPN-S/2", "hidden_size": 48, "depth": 2, "num_heads": 2},
                    checkpoint={"every": 4, "keep_last": 3})
    straight = write_config(tmp_path / "a.yaml", tiny_config(tmp_path / "a", **sections))
    killed = write_config(tmp_path / "b.yaml", tiny_config(tmp_path / "b", **sections))

    proc = subprocess.Popen(_train_cmd(killed), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (tmp_path / "b" / "checkpoints" / "0000004").exists():
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
        assert time.time() < deadline, "no checkpoint after 120 s"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    done = [int(p.name) for p in list_checkpoints(tmp_path / "b")]
    assert done and max(done) < steps, "the kill came too late to test a resume"

    for cmd in (_train_cmd(straight), _train_cmd(killed, "--resume")):
        done = subprocess.run(cmd, env=_env(), capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
    a = _final_tensors(tmp_path / "a" / "checkpoints" / f"{steps:07d}")
    b = _final_tensors(tmp_path / "b" / "checkpoints" / f"{steps:07d}")
    assert a.keys() == b.keys() and len(a) > 20
    mismatched = [k for k in a if not torch.equal(a[k], b[k])]
    assert not mismatched, f"resumed run differs in {mismatched[:5]}"


WORKER = """
import os, sys, torch
from dit_gspn.training import load_config, train
result = train(load_config(sys.argv[1]))
torch.save(result.model.state_dict(), os.path.join(sys.argv[2], f"rank{os.environ['RANK']}.pt"))
sys.stdout.flush(); sys.stderr.flush()
import torch.distributed as dist
dist.destroy_process_group()
os._exit(0)
"""


def test_two_process_ddp_keeps_ranks_in_sync(tmp_path):
    config = tiny_config(tmp_path / "run", train={"steps": 3, "grad_accum_steps": 1}, checkpoint={"every": 100})
    path = write_config(tmp_path / "c.yaml", config)
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           str(worker), str(path), str(tmp_path)]
    proc = subprocess.run(cmd, env={**_env(), "ACCELERATE_USE_CPU": "true"}, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert rank0.keys() == rank1.keys()
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    state = (tmp_path / "run" / "checkpoints" / "0000003" / "trainer_state.json").read_text()
    assert '"num_processes": 2' in state
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints" / "0000003" / "rng").iterdir()) == \
        ["rank0.safetensors", "rank1.safetensors"]
    saved = load_file(tmp_path / "run" / "checkpoints" / "0000003" / "model" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(saved[k], rank0[k]) for k in saved)
    # ... and the steps did train: the weights moved from the (seeded) initial ones.
    from dit_gspn.training.config import parse_config
    from dit_gspn.training.datasets import build_training_data
    from dit_gspn.training.trainer import build_model
    torch.manual_seed(config["seed"])
    parsed = parse_config(load_config(path))
    init = build_model(parsed, build_training_data(parsed)).state_dict()
    assert not torch.equal(init["final_layer.linear.weight"], rank0["final_layer.linear.weight"])


def test_ema_update_and_warmup_follow_dit_and_diffusers():
    from dit_gspn.training.ema import ema_decay_at, make_ema, update_ema

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    ema = make_ema(model)
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    update_ema(ema, model, 0.9)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(ema.state_dict()[k], 0.9 * before[k] + 0.1 * v)
    assert ema_decay_at(1, 0.9999, warmup=False) == 0.9999
    assert ema_decay_at(1, 0.9999, warmup=True) == 2 / 11 and ema_decay_at(10**6, 0.9999, warmup=True) == 0.9999


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
