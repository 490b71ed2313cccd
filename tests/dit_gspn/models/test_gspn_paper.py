"""The GSPN authors' network (GSPN-paper-*): their parameter counts, their checkpoints loaded with strict keys and
computing what their code computes (an oracle transcribed here from their generation/gspn.py and their CUDA
scan, in float64, with their key names), the as-released directions against the reference scan, gradients,
the mixer inside DiT blocks, and sample.py on a file in their train.py format."""
import argparse
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from dit_gspn import ops
from dit_gspn.checkpoint import CheckpointError
from dit_gspn.models import DiT, create_model
from dit_gspn.models.gspn_paper import AS_RELEASED, GSPNPaper, GSPNPaperMixer, as_released_scan
from dit_gspn.ops.reference import gspn_scan_reference, line_scan_reference
from dit_gspn.image_npz import read_npz
from dit_gspn.sampling.model_loader import load_model

from helpers.entry_points import load_script

CLASSES, LATENT, WIDTH = 5, 12, 32


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----------------------------------------------------------------------------- the authors' code, transcribed


def authors_state_dict(hidden=WIDTH, depth=4, patch=2, channels=4, classes=CLASSES, seed=0, dtype=torch.float64):
    """Random weights under the keys and shapes of their ``GSPN(..., no_aln_0=False)``'s state dict (their
    Linear2d in_proj stores a (C, C) matrix; their other 1x1 layers are convolutions)."""
    g = torch.Generator().manual_seed(seed)
    C, r = hidden, hidden // 16

    def rand(*shape, scale=None):
        fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
        return torch.randn(*shape, generator=g, dtype=dtype) * (scale if scale is not None else fan_in ** -0.5)

    state = {"x_embedder.proj.weight": rand(C, channels, patch, patch), "x_embedder.proj.bias": rand(C, scale=0.1),
             "t_embedder.mlp.0.weight": rand(C, 256), "t_embedder.mlp.0.bias": rand(C, scale=0.1),
             "t_embedder.mlp.2.weight": rand(C, C), "t_embedder.mlp.2.bias": rand(C, scale=0.1),
             "y_embedder.embedding_table.weight": rand(classes + 1, C, scale=1.0),
             "norm_f.weight": 1 + rand(C, scale=0.1), "norm_f.bias": rand(C, scale=0.1),
             "final_layer.linear.weight": rand(patch * patch * 2 * channels, C),
             "final_layer.linear.bias": rand(patch * patch * 2 * channels, scale=0.1),
             "final_layer.adaLN_modulation.1.weight": rand(2 * C, C),
             "final_layer.adaLN_modulation.1.bias": rand(2 * C, scale=0.1)}
    names = [f"in_blocks.{i}" for i in range(depth // 2)] + ["mid_block"] + [f"out_blocks.{i}" for i in range(depth // 2)]
    for name in names:
        block = {"in_proj.weight": rand(C, C), "conv2d.weight": rand(C, 1, 7, 7, scale=0.2), "conv2d.bias": rand(C, scale=0.1),
                 "out_conv.weight": rand(C, C, 1, 1), "out_dconv.weight": rand(C, 1, 3, 3, scale=0.3),
                 "out_proj.weight": rand(C, C), "x_conv_down.weight": rand(r, C, 1, 1),
                 "w_conv_up.weight": rand(12 * C, r, 1, 1, scale=1.0), "l_conv_up.weight": rand(4 * C, r, 1, 1),
                 "u_conv_up.weight": rand(4 * C, r, 1, 1), "d_conv.weight": rand(4 * C, r, 1, 1),
                 "m_conv.weight": rand(1, 4, 1, 1, scale=0.5), "norm.weight": 1 + rand(C, scale=0.1),
                 "norm.bias": rand(C, scale=0.1)}
        if name.startswith("out_blocks"):
            block.update({"skip_linear.weight": rand(C, 2 * C), "skip_linear.bias": rand(C, scale=0.1)})
        state.update({f"{name}.{k}": v for k, v in block.items()})
    return state


def authors_kernel_scan(X, B, G1, G2, G3, items_each_chunk):
    """Their gaterecurrent2dnoind forward: left to right along W in chunks of ``items_each_chunk`` columns (from
    the left); H[h, w] = B X + G1 H[h-1, w-1] + G2 H[h, w-1] + G3 H[h+1, w-1], out-of-range terms 0."""
    H = torch.zeros_like(X)
    for w in range(X.shape[-1]):
        h = B[..., w] * X[..., w]
        if w % items_each_chunk:
            prev = H[..., w - 1]
            h = h + G1[..., w] * F.pad(prev[..., :-1], (1, 0)) + G2[..., w] * prev + G3[..., w] * F.pad(prev[..., 1:], (0, 1))
        H[..., w] = h
    return H


def authors_normalize_w(Gl, Gm, Gr):
    Gl, Gm, Gr = torch.sigmoid(Gl), torch.sigmoid(Gm), torch.sigmoid(Gr)
    total = Gl + Gm + Gr
    total[:, :, 0, :] = Gm[:, :, 0, :] + Gr[:, :, 0, :]
    total[:, :, -1, :] = Gl[:, :, -1, :] + Gm[:, :, -1, :]
    total = total.clamp(min=1e-7)
    return Gl / total, Gm / total, Gr / total


def authors_block(s, prefix, hidden_states, shortcut, skip, items_each_chunk):
    """Their Block.forward (eval mode) with the weights ``s[prefix + ...]``: (out_states, shortcut)."""
    w = lambda k: s[f"{prefix}.{k}"]
    if skip is not None:
        hidden_states = F.linear(torch.cat([hidden_states, skip], dim=-1), w("skip_linear.weight"), w("skip_linear.bias"))
    shortcut = hidden_states if shortcut is None else shortcut + hidden_states
    x = F.layer_norm(shortcut, shortcut.shape[-1:], w("norm.weight"), w("norm.bias"), eps=1e-5)
    Bn, T, D = x.shape
    H = W = int(T ** 0.5)
    x = x.transpose(2, 1).reshape(Bn, D, H, W)
    x = F.conv2d(x, w("in_proj.weight")[:, :, None, None])
    x = F.conv2d(x, w("conv2d.weight"), w("conv2d.bias"), padding=3, groups=D)
    proxy = F.conv2d(x, w("x_conv_down.weight"))
    ws, Ls, Us, Ds = (F.conv2d(proxy, w(k)) for k in ("w_conv_up.weight", "l_conv_up.weight", "u_conv_up.weight",
                                                        "d_conv.weight"))
    x_hwwh = torch.stack([x, x.transpose(2, 3)], dim=1)
    xs = torch.cat([x_hwwh, x_hwwh.flip(dims=[-1])], dim=1).reshape(Bn, 4 * D, H, W)
    Gl, Gm, Gr = authors_normalize_w(*torch.split(ws, 4 * D, dim=1))
    out = authors_kernel_scan(xs, Ls, Gl, Gm, Gr, items_each_chunk) * Us + xs * Ds
    out = F.conv2d(out.reshape(Bn, 4, D * H, W), w("m_conv.weight")).reshape(Bn, D, H, W)
    out = F.conv2d(out, w("out_conv.weight"))
    out = F.conv2d(out, w("out_dconv.weight"), padding=1, groups=D)
    out = out * F.relu(out)
    out = out.reshape(Bn, D, H * W).transpose(2, 1)
    return F.linear(out, w("out_proj.weight")), shortcut


def authors_forward(s, x, t, y, depth, chunk_of_block):
    """Their GSPN.forward (eval, no label dropout); ``chunk_of_block(index)`` the chunk of block ``index``."""
    weight = s["x_embedder.proj.weight"]
    C, patch = weight.shape[0], weight.shape[-1]
    tokens = F.conv2d(x, weight, s["x_embedder.proj.bias"], stride=patch).flatten(2).transpose(1, 2)
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    t_freq = torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(weight.dtype)
    t_emb = F.linear(F.silu(F.linear(t_freq, s["t_embedder.mlp.0.weight"], s["t_embedder.mlp.0.bias"])),
                     s["t_embedder.mlp.2.weight"], s["t_embedder.mlp.2.bias"])
    c = (t_emb + s["y_embedder.embedding_table.weight"][y]).unsqueeze(1)
    hidden, shortcut, skips = tokens + c, None, []
    for i in range(depth // 2):
        hidden, shortcut = authors_block(s, f"in_blocks.{i}", hidden, shortcut, None, chunk_of_block(i))
        skips.append(hidden)
    hidden, shortcut = authors_block(s, "mid_block", hidden, shortcut, None, chunk_of_block(depth // 2))
    for i in range(depth // 2):
        hidden, shortcut = authors_block(s, f"out_blocks.{i}", hidden, shortcut, skips.pop(),
                                         chunk_of_block(depth // 2 + 1 + i))
    h = F.layer_norm(shortcut + hidden, (C,), s["norm_f.weight"], s["norm_f.bias"], eps=1e-5)
    shift, scale = F.linear(F.silu(c), s["final_layer.adaLN_modulation.1.weight"],
                            s["final_layer.adaLN_modulation.1.bias"]).chunk(2, dim=-1)
    h = F.layer_norm(h, (C,), eps=1e-6) * (1 + scale) + shift
    out = F.linear(h, s["final_layer.linear.weight"], s["final_layer.linear.bias"])
    n, out_channels = int(out.shape[1] ** 0.5), out.shape[2] // patch ** 2
    out = out.reshape(len(x), n, n, patch, patch, out_channels)  # B (h w) (p1 p2 C) -> B C (h p1) (w p2)
    return out.permute(0, 5, 1, 3, 2, 4).reshape(len(x), out_channels, n * patch, n * patch)


def as_released_chunks(index):
    return 2  # every block: Block passes its items_each_chunk argument, not the attribute, to the scan


def as_meant_chunks(depth):
    return lambda index: LATENT if index >= depth - 1 else 2  # the last 2 out-blocks: chunk = img_size (global)


def save_authors_checkpoint(path, depth=4, **kwargs):
    """The file their train.py writes: {model, ema, opt, args}, args its argparse.Namespace."""
    model, ema = authors_state_dict(depth=depth, seed=1, **kwargs), authors_state_dict(depth=depth, seed=2, **kwargs)
    model32 = {k: v.float() for k, v in model.items()}
    args = argparse.Namespace(feature_path="features", results_dir="results", model="GSPN-XL/2", global_seed=420,
                              image_size=8 * LATENT, num_classes=CLASSES, vae="ema", num_workers=16, log_every=1000,
                              ckpt_every=25000, ckpt=None, global_batch_size=1024, warmup_epochs=5, epochs=1500,
                              lr=1e-4, min_lr=1e-6, local_rank=0)
    torch.save({"model": model32, "ema": {k: v.float() for k, v in ema.items()},
                "opt": {"state": {}, "param_groups": []}, "args": args}, path)
    return model, ema


def inputs(B=3, size=LATENT, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, 4, size, size, generator=g, dtype=dtype), torch.tensor([0, 321, 999][:B]),
            torch.tensor([4, 0, 2][:B]))


# ----------------------------------------------------------------------------- sizes


def test_zoo_sizes_have_the_authors_parameter_counts():
    with torch.device("meta"):
        counts = {name: create_model(name).num_parameters() for name in ("GSPN-paper-XL/2", "GSPN-paper-L/2",
                                                                        "GSPN-paper-B/2")}
        xl = create_model("GSPN-paper-XL/2")
    assert counts == {"GSPN-paper-XL/2": 723_513_260, "GSPN-paper-L/2": 465_230_660, "GSPN-paper-B/2": 144_016_356}
    assert len(xl.blocks) == 57 and xl.pos_embed is None and xl.blocks[0].token_mixer.proxy_dim == 1500 // 16


def test_chunks_as_meant_and_as_released_and_drop_path_rates():
    model = create_model("GSPN-paper-S/2", depth=6, hidden_size=32, drop_path=0.1)
    assert [b.token_mixer.chunk for b in model.blocks] == [2] * 5 + [None] * 2  # the last 2 out-blocks global
    released = create_model("GSPN-paper-S/2", depth=6, hidden_size=32, **AS_RELEASED)
    assert [b.token_mixer.chunk for b in released.blocks] == [2] * 7
    assert all(b.token_mixer.directions == "as_released" for b in released.blocks)
    # Their dpr: block k's input at linspace(0, 0.1, depth)[k - 1], the last block's output at 0.1.
    expected = [0.0] + torch.linspace(0, 0.1, 6).tolist()
    np.testing.assert_allclose([b.drop_path.p for b in model.blocks], expected, atol=1e-7)
    assert model.last_drop_path.p == 0.1


# ----------------------------------------------------------------------------- their checkpoints


@pytest.mark.parametrize("weights", ["ema", "model"])
def test_their_train_py_checkpoint_loads_strictly_and_computes_their_forward(tmp_path, weights):
    path = tmp_path / "0400000.pt"
    state = dict(zip(("model", "ema"), save_authors_checkpoint(path)))[weights]
    model, info = load_model(path, weights=weights, model_name="GSPN-paper-XL/2")
    assert isinstance(model, GSPNPaper) and not model.training
    assert (model.config.hidden_size, model.config.depth, model.patch_size, model.num_classes) == (WIDTH, 4, 2, CLASSES)
    assert {k: model.config[k] for k in AS_RELEASED} == AS_RELEASED
    assert info.image_size == (8 * LATENT, 8 * LATENT) and info.num_classes == CLASSES and info.objective == "ddpm"
    x, t, y = inputs()
    with torch.no_grad():
        ours = model.double()(x, t, y)
    expected = authors_forward({k: v.float().double() for k, v in state.items()}, x, t, y, 4, as_released_chunks)
    assert ours.shape == (3, 8, LATENT, LATENT)
    torch.testing.assert_close(ours, expected, rtol=1e-9, atol=1e-9)


def test_their_network_as_meant_equals_their_code_with_global_last_out_blocks():
    depth = 6
    state = authors_state_dict(depth=depth)
    from dit_gspn.models.gspn_paper import from_authors_state_dict

    model = create_model("GSPN-paper-XL/2", input_size=LATENT, hidden_size=WIDTH, depth=depth, num_classes=CLASSES,
                         directions="as_released", global_layers=2).double().eval()
    model.load_state_dict(from_authors_state_dict(state), strict=True)
    x, t, y = inputs()
    with torch.no_grad():
        ours = model(x, t, y)
    torch.testing.assert_close(ours, authors_forward(state, x, t, y, depth, as_meant_chunks(depth)), rtol=1e-9, atol=1e-9)
    # The oracle tells the chunk modes apart: with every block local it computes something else.
    assert (ours - authors_forward(state, x, t, y, depth, as_released_chunks)).abs().max() > 1e-3


def test_a_bare_state_dict_loads_and_a_foreign_key_is_named(tmp_path):
    state = {k: v.float() for k, v in authors_state_dict().items()}
    torch.save(state, tmp_path / "bare.pt")
    model, _ = load_model(tmp_path / "bare.pt", model_name="GSPN-paper-B/4", image_size=(8 * LATENT, 8 * LATENT))
    assert model.config.directions == "as_released" and model.config.hidden_size == WIDTH
    torch.save({**state, "pos_embed": torch.zeros(1, 36, WIDTH)}, tmp_path / "planted.pt")
    with pytest.raises(CheckpointError, match=r"planted.pt is not a checkpoint of the GSPN authors' network.*pos_embed"):
        load_model(tmp_path / "planted.pt", model_name="GSPN-paper-XL/2")
    del state["mid_block.norm.bias"]
    torch.save(state, tmp_path / "short.pt")
    with pytest.raises(CheckpointError, match=r"1 missing keys \(e.g. mid_block.norm.bias\)"):
        load_model(tmp_path / "short.pt", model_name="GSPN-paper-XL/2")
    with pytest.raises(CheckpointError, match="GSPN-paper-XL/2 has no attention heads"):
        load_model(tmp_path / "bare.pt", model_name="GSPN-paper-XL/2", num_heads=4)


def test_sample_py_draws_from_their_checkpoint(tmp_path):
    from diffusers import AutoencoderKL

    path = tmp_path / "0400000.pt"
    save_authors_checkpoint(path)
    vae_dir = tmp_path / "vae"  # a tiny VAE that halves the size, so that no download is needed
    AutoencoderKL(block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4, latent_channels=4,
                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2
                  ).save_pretrained(vae_dir)
    out = tmp_path / "samples.npz"
    argv = ["--model", "GSPN-paper-XL/2", "--ckpt", str(path), "--vae", str(vae_dir), "--sampler", "ddpm",
            "--num-steps", "2", "--num-samples", "2", "--seed", "0", "--cpu", "--out", str(out)]
    assert load_script("sample").main(argv) == 0
    images, labels = read_npz(out)
    assert images.shape == (2, 2 * LATENT, 2 * LATENT, 3) and images.dtype == np.uint8 and len(labels) == 2


# ----------------------------------------------------------------------------- the directions


def _maps(B, C, n, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, n, n, generator=g, dtype=dtype)
    lam, gl, gc, gr, u, skip = (torch.randn(B, 4, C, n, n, generator=g, dtype=dtype) for _ in range(6))
    return x, lam, gl, gc, gr, u, skip


def as_released_by_copies(x, lam, gl, gc, gr, u, skip, chunk):
    """Their four copies in their order, each scanned left to right (the reference line scan on transposes),
    nothing mapped back; the per-pixel maps in our direction order (top-down, bottom-up, left-right, right-left)."""
    theirs = (2, 0, 3, 1)  # for their copy k (x, x^T, flip(x), flip(x^T)), our direction
    copies = [x, x.transpose(-1, -2), x.flip(-1), x.transpose(-1, -2).flip(-1)]
    T = lambda m: m.transpose(-1, -2)
    y = 0
    for copy, d in zip(copies, theirs):
        wl, wc, wr = ops.normalize_gates(T(gl[:, d]), T(gc[:, d]), T(gr[:, d]))
        scanned = T(line_scan_reference(T(copy), T(lam[:, d]), wl, wc, wr, chunk))
        y = y + u[:, d] * scanned + skip[:, d] * copy
    return y


@pytest.mark.parametrize("chunk", [None, 2, 3])
def test_as_released_scan_equals_the_reference_on_their_copies(chunk):
    maps = _maps(2, 3, 7, seed=chunk or 0)
    torch.testing.assert_close(as_released_scan(*maps, chunk=chunk), as_released_by_copies(*maps, chunk),
                               rtol=1e-12, atol=1e-12)
    low = [m.float() for m in maps]
    torch.testing.assert_close(as_released_scan(*low, chunk=chunk), as_released_by_copies(*maps, chunk).float(),
                               rtol=1e-5, atol=1e-5)


def test_as_released_scan_gradients_against_finite_differences():
    maps = [m.requires_grad_() for m in _maps(1, 2, 4, seed=3)]
    assert torch.autograd.gradcheck(lambda *m: as_released_scan(*m, chunk=3), maps)


def test_an_impulse_lands_on_its_own_pixel_only_when_aligned():
    """No propagation (chunk 1), lam = u = 1: each direction returns its input. As released, the impulse at
    (1, 4) of a 6 x 6 map comes back at its place in each copy: (1, 4), (4, 1), (1, 1) and (4, 4)."""
    x = torch.zeros(1, 1, 6, 6, dtype=torch.float64)
    x[..., 1, 4] = 1
    ones, zeros = torch.ones(1, 4, 1, 6, 6, dtype=torch.float64), torch.zeros(1, 4, 1, 6, 6, dtype=torch.float64)
    released = as_released_scan(x, ones, zeros, zeros, zeros, ones, zeros, chunk=1)
    assert sorted(map(tuple, released[0, 0].nonzero().tolist())) == [(1, 1), (1, 4), (4, 1), (4, 4)]
    aligned = gspn_scan_reference(x, ones, zeros, zeros, zeros, ones, chunk=1)
    assert aligned[0, 0].nonzero().tolist() == [[1, 4]] and aligned[0, 0, 1, 4] == 4


def _mixer(directions, chunk=2, dim=32, seed=0):
    torch.manual_seed(seed)
    mixer = GSPNPaperMixer(dim, chunk=chunk, directions=directions).double()
    with torch.no_grad():
        for p in mixer.parameters():
            p.normal_(0, 0.3)
    return mixer


@pytest.mark.parametrize("chunk", [None, 2])
def test_aligned_mixer_propagation_is_the_reference_scan_of_its_maps(chunk):
    """Aligned: the fused proxy scan equals the reference four-direction scan of lam, u * merge, the gates, plus
    the merged skip, each map written out here from the weights."""
    mixer = _mixer("aligned", chunk)
    B, h, w, C = 2, 5, 7, 32
    x, p = torch.randn(B, h * w, C, dtype=torch.float64), torch.randn(B, h * w, 2, dtype=torch.float64)
    as_map = lambda t: t.transpose(1, 2).reshape(B, -1, h, w).view(B, 4, -1, h, w)
    gl, gc, gr = (as_map(p @ W.T) for W in mixer.gate_proj.weight.view(3, 4 * C, 2))
    lam, u, skip = (as_map(p @ layer.weight.T) for layer in (mixer.lam_proj, mixer.u_proj, mixer.skip_proj))
    m = mixer.merge.detach()[None, :, None, None, None]
    x_map = x.transpose(1, 2).reshape(B, C, h, w)
    expected = gspn_scan_reference(x_map, lam, gl, gc, gr, u * m, chunk) + (skip * m).sum(1) * x_map
    got = mixer.propagate(x, p, (h, w)).transpose(1, 2).reshape(B, C, h, w)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_the_modes_agree_on_the_left_right_scan_alone_and_differ_otherwise():
    aligned, released = _mixer("aligned"), _mixer("as_released")
    tokens = torch.randn(2, 36, 32, dtype=torch.float64)
    with torch.no_grad():
        assert (aligned(tokens, (6, 6)) - released(tokens, (6, 6))).abs().max() > 1e-3
        for mixer in (aligned, released):
            mixer.merge.copy_(torch.tensor([0.0, 0.0, 0.7, 0.0]))  # left-right only (our order)
        torch.testing.assert_close(aligned(tokens, (6, 6)), released(tokens, (6, 6)), rtol=1e-10, atol=1e-10)


def test_as_released_needs_a_square_grid_and_aligned_runs_any():
    tokens = torch.randn(1, 24, 32, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"needs a square token grid, got \(h, w\) = \(4, 6\); use directions='aligned'"):
        _mixer("as_released")(tokens, (4, 6))
    assert _mixer("aligned")(tokens, (4, 6)).shape == (1, 24, 32)
    with pytest.raises(ValueError, match="directions must be one of"):
        GSPNPaperMixer(32, directions="mapped")
    with pytest.raises(ValueError, match="depth must be an even number"):
        create_model("GSPN-paper-S/2", depth=3)


# ----------------------------------------------------------------------------- training machinery


def tiny(**overrides) -> GSPNPaper:
    model = create_model("GSPN-paper-S/2", **{"input_size": 12, "hidden_size": 32, "depth": 4, "num_classes": CLASSES,
                                             **overrides})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("directions", ["aligned", "as_released"])
def test_zero_output_at_init_and_gradients_reach_every_parameter(directions):
    x, t, y = (v.float() if v.is_floating_point() else v for v in inputs())
    fresh = create_model("GSPN-paper-S/2", input_size=12, hidden_size=32, depth=4, num_classes=CLASSES,
                         directions=directions)
    assert fresh(x, t, y).abs().max() == 0  # the zeroed adaLN final layer
    model = tiny(directions=directions).train()
    model(x, t, y).square().mean().backward()
    silent = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().max() == 0]
    assert silent == []


def test_gradient_checkpointing_gives_the_same_gradients_and_drop_path_only_trains():
    model = tiny(drop_path=0.3).train()
    x, t, y = (v.float() if v.is_floating_point() else v for v in inputs())
    torch.manual_seed(1)
    model(x, t, y).square().mean().backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.enable_gradient_checkpointing()
    torch.manual_seed(1)
    model(x, t, y).square().mean().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, plain[n], msg=n)
    model.disable_gradient_checkpointing()
    with torch.no_grad():
        torch.manual_seed(2)
        first = model(x, t, y)
        assert (model(x, t, y) - first).abs().max() > 0  # dropped paths (and labels) differ between calls
        model.eval()
        torch.testing.assert_close(model(x, t, y), model(x, t, y), rtol=0, atol=0)


def test_save_pretrained_round_trips_and_loads_through_load_model(tmp_path):
    model = tiny(directions="as_released", global_layers=0).eval()
    model.save_pretrained(tmp_path)
    loaded, info = load_model(tmp_path)
    assert isinstance(loaded, GSPNPaper) and loaded.config.directions == "as_released"
    x, t, y = (v.float() if v.is_floating_point() else v for v in inputs())
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, y), model(x, t, y), rtol=0, atol=0)
        null = torch.full_like(y, CLASSES)
        guided = model.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]), cfg_scale=2.0)
    assert guided.shape == (6, 8, LATENT, LATENT) and info.image_size == (8 * LATENT, 8 * LATENT)  # latents: SD-VAE pixels


def test_the_mixer_runs_inside_dit_blocks():
    model = DiT(input_size=8, patch_size=2, hidden_size=32, depth=3, num_heads=4, num_classes=CLASSES,
                mixer="gspn-paper", mixer_kwargs=dict(chunk=3, global_layers=1))
    assert [b.mixer.chunk for b in model.blocks] == [3, 3, None]
    assert isinstance(model.blocks[0].mixer, GSPNPaperMixer)
    x, t, y = torch.randn(2, 4, 8, 12), torch.tensor([5, 900]), torch.tensor([0, 1])
    assert model(x, t, y).shape == (2, 8, 8, 12)


class _FailOnHostRead(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            raise AssertionError("a tensor's value was read on the host")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("directions", ["aligned", "as_released"])
def test_forward_never_reads_a_tensor_value_on_the_host(directions):
    model = tiny(directions=directions, drop_path=0.1).train()
    x, t, y = (v.float() if v.is_floating_point() else v for v in inputs())
    with _FailOnHostRead():
        model(x, t, y).sum().backward()
