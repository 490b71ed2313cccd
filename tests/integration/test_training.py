"""train.py run as processes: a real SIGKILL and a resume that must end bitwise equal to an uninterrupted
run, and two-process DDP whose ranks stay in sync."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from dit_gspn.training import list_checkpoints, load_config

from helpers.repo import REPO
from helpers.training import tiny_config, write_config


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
