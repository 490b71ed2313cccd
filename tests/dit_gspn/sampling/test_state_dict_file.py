"""DiT's and SiT's own checkpoint files (made here in their train.py's exact format, small sizes) load and
sample as those projects' sampling equations say: ADM's DDPM for DiT, SiT's velocity ODE for SiT."""
import argparse
import hashlib
import json
import pathlib
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from diffusers import AutoencoderKL

from dit_gspn.errors import UserError
from dit_gspn.diffusion import make_schedule
from dit_gspn.models import create_model
from dit_gspn.image_npz import read_npz, to_uint8
from dit_gspn.sampling import sample
from dit_gspn.sampling.batch import BatchPlan, index_generators
from dit_gspn.checkpoint import CheckpointError
from dit_gspn.sampling.model_loader import load_model
from dit_gspn.vae import load_vae

from helpers import adm_sampling as adm
from helpers.entry_points import load_script


CLASSES, LATENT = 5, 8


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def dit_network(seed, hidden_size=64, num_heads=4, learn_sigma=True):
    """DiT's network (SiT's is the same module) at a width outside the zoo, with a random output layer."""
    torch.manual_seed(seed)
    net = create_model("DiT-S/2", depth=2, hidden_size=hidden_size, num_heads=num_heads, input_size=LATENT,
                       num_classes=CLASSES, learn_sigma=learn_sigma)
    for layer in (net.final_layer.linear, net.final_layer.adaLN_modulation[-1]):
        nn.init.normal_(layer.weight, std=0.05)
    return net.eval()


def save_train_py_checkpoint(path, project="DiT", **net_kwargs):
    """The file facebookresearch/DiT's (or willisma/SiT's) train.py writes: {model, ema, opt, args} with args
    its argparse.Namespace. Returns (model, ema) as modules."""
    model, ema = dit_network(1, **net_kwargs), dit_network(2, **net_kwargs)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)
    model(torch.randn(1, 4, LATENT, LATENT), torch.tensor([3]), torch.tensor([1])).sum().backward()
    opt.step()
    args = argparse.Namespace(data_path="/data/imagenet/train", results_dir="results", model=f"{project}-S/2",
                              image_size=8 * LATENT, num_classes=CLASSES, epochs=1400, global_batch_size=256,
                              global_seed=0, vae="mse", num_workers=4, log_every=100, ckpt_every=50_000)
    if project == "SiT":
        vars(args).update(path_type="Linear", prediction="velocity", loss_weight=None, sample_eps=None,
                          train_eps=None)
    torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "args": args}, path)
    return model, ema


def _same_weights(a, b):
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=name)


def test_dit_train_py_checkpoint_loads_safely_with_its_sizes_and_ema_by_default(tmp_path):
    path = tmp_path / "0400000.pt"
    model, ema = save_train_py_checkpoint(path)
    with pytest.raises(pickle.UnpicklingError, match="argparse.Namespace"):  # what torch alone says
        torch.load(path, weights_only=True)
    loaded, info = load_model(path, model_name="DiT-XL/2", num_heads=4)
    _same_weights(loaded, ema)
    assert (loaded.config.hidden_size, loaded.config.depth, loaded.patch_size, loaded.num_classes) == (64, 2, 2, 5)
    assert info.image_size == (64, 64) and info.vae == "stabilityai/sd-vae-ft-mse" and info.objective == "ddpm"
    raw, _ = load_model(path, weights="model", model_name="DiT-XL/2", num_heads=4)
    _same_weights(raw, model)
    with pytest.raises(CheckpointError, match="width 64, not DiT-XL/2's: pass --num-heads"):
        load_model(path, model_name="DiT-XL/2")


def test_a_training_file_holding_more_than_an_argparse_namespace_is_refused(tmp_path):
    path = tmp_path / "planted.pt"
    model = dit_network(0)
    args = argparse.Namespace(model="DiT-S/2", results_dir=pathlib.PurePosixPath("results"))
    torch.save({"model": model.state_dict(), "ema": model.state_dict(), "opt": {}, "args": args}, path)
    with pytest.raises(CheckpointError, match="refused.*PurePosixPath"):
        load_model(path, model_name="DiT-S/2", num_heads=4)


def _tiny_vae_dir(root: Path) -> Path:
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    vae.save_pretrained(root / "vae")
    return root / "vae"


def _sample_py_main():
    return load_script("sample").main


def _initial_noise(n, seed):
    gens = index_generators(seed, range(n))
    return torch.cat([torch.randn((1, 4, LATENT, LATENT), generator=g) for g in gens]).double(), gens


def _sample_py_npz(model_name, ckpt, vae_dir, sampler, steps, n, seed, out):
    """sample.py's batch mode on a .pt checkpoint (4 heads, a local VAE, CPU); the .npz's (images, labels)."""
    assert _sample_py_main()(["--model", model_name, "--ckpt", str(ckpt), "--num-heads", "4", "--vae", str(vae_dir),
                              "--sampler", sampler, "--num-steps", str(steps), "--num-samples", str(n),
                              "--seed", str(seed), "--cpu", "--out", str(out)]) == 0
    return read_npz(out)


def _assert_decodes_to(images, latents, vae_dir, scale=0.18215):
    """``images`` (uint8) are ``latents`` decoded by the VAE, up to a rounding flip in under 1% of the values."""
    vae = load_vae(str(vae_dir))
    with torch.no_grad():
        expected = to_uint8(vae.decode(latents.float() / scale).sample.clamp(-1, 1))
    diff = np.abs(images.astype(int) - expected.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01


def test_dit_checkpoint_samples_through_sample_py_as_adms_ddpm(tmp_path):
    path = tmp_path / "0400000.pt"
    _, ema = save_train_py_checkpoint(path)
    vae_dir = _tiny_vae_dir(tmp_path)
    n, steps, seed = 4, 5, 3
    images, labels = _sample_py_npz("DiT-XL/2", path, vae_dir, "ddpm", steps, n, seed, tmp_path / "samples.npz")
    np.testing.assert_array_equal(labels, BatchPlan(n, CLASSES, 32, "uniform", seed).labels())
    provenance = json.loads((tmp_path / "samples.provenance.json").read_text())
    assert provenance["checkpoint_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert {k: provenance[k] for k in ("sampler", "num_steps", "cfg_scale", "seed", "num_samples", "count",
                                       "class_mode", "weights", "model", "objective")} == dict(
        sampler="ddpm", num_steps=steps, cfg_scale=1.0, seed=seed, num_samples=n, count=n, class_mode="uniform",
        weights="ema", model="DiT-XL/2", objective="ddpm")
    assert provenance["versions"]["torch"] == torch.__version__ and provenance["guided_channels"] is None

    # ADM's p_sample loop (tests/helpers/adm_sampling.py, float64) on DiT's network as DiT's sample.py calls it.
    net64 = ema.double()
    y = torch.as_tensor(labels)
    x, gens = _initial_noise(n, seed)

    def model_fn(x, t):
        out = net64(x, torch.full((n,), int(t)), y)
        return out[:, :4], out[:, 4:]

    draw = lambda: torch.cat([torch.randn((1, 4, LATENT, LATENT), generator=g) for g in gens]).double()
    oracle = adm.ddpm_loop(model_fn, x, steps, draw, learned=True, clip=False)
    _assert_decodes_to(images, oracle, vae_dir)


def sit_euler(net, x, labels, sigmas, cfg_scale=1.0):
    """SiT's probability-flow ODE dx/dt = v(x, t), t = 0 noise -> t = 1 data, Euler steps on the time grid
    t_k = 1 - sigma_k, with SiT's network called as SiT's sample.py does (t in [0, 1]; velocity = the first
    C channels; guidance on the first 3 of them through forward_with_cfg); float64."""
    ts = 1.0 - sigmas.double()
    for t, t_next in zip(ts[:-1], ts[1:]):
        tb = torch.full((len(x),), float(t), dtype=torch.float64)
        if cfg_scale > 1:
            null = torch.full_like(labels, CLASSES)
            v = net.forward_with_cfg(torch.cat([x, x]), torch.cat([tb, tb]), torch.cat([labels, null]), cfg_scale,
                                     3)[: len(x), :4]
        else:
            v = net(x, tb, labels)[:, :4]
        x = x + (t_next - t) * v
    return x


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_sit_checkpoint_samples_with_euler_as_sits_ode(tmp_path, cfg_scale):
    path = tmp_path / "sit.pt"
    _, ema = save_train_py_checkpoint(path, project="SiT")
    model, info = load_model(path, model_name="SiT-XL/2", num_heads=4)
    assert info.objective == "flow" and model.out_channels == 4 and ema.learn_sigma  # learn_sigma heads
    n, steps, seed = 3, 6, 1
    labels = torch.tensor([0, 4, 2])
    ours = sample(model, labels, sampler="euler", num_steps=steps, cfg_scale=cfg_scale, guided_channels=3,
                  generator=index_generators(seed, range(n)))
    x, _ = _initial_noise(n, seed)
    sigmas = make_schedule("euler", steps).scheduler.sigmas  # the grid is the sampler's; the convention is SiT's
    oracle = sit_euler(ema.double(), x, labels, sigmas, cfg_scale)
    torch.testing.assert_close(ours.double(), oracle, rtol=1e-4, atol=1e-4)
    # Without the time and sign map the same network gives other samples: the test can tell.
    assert (oracle - sit_euler(ema.double(), x, labels, 1.0 - sigmas, cfg_scale)).abs().max() > 0.1


def test_sit_checkpoint_through_sample_py_and_a_non_linear_sit_refused(tmp_path):
    path = tmp_path / "sit.pt"
    _, ema = save_train_py_checkpoint(path, project="SiT")
    vae_dir = _tiny_vae_dir(tmp_path)
    n, steps, seed = 2, 4, 5
    images, labels = _sample_py_npz("SiT-XL/2", path, vae_dir, "euler", steps, n, seed, tmp_path / "sit.npz")
    x, _ = _initial_noise(n, seed)
    oracle = sit_euler(ema.double(), x, torch.as_tensor(labels), make_schedule("euler", steps).scheduler.sigmas)
    _assert_decodes_to(images, oracle, vae_dir)

    raw = torch.load(path, weights_only=False)
    raw["args"].path_type = "GVP"
    torch.save(raw, path)
    with pytest.raises(UserError, match="path_type=GVP.*only SiT's default"):
        load_model(path, model_name="SiT-XL/2", num_heads=4)
