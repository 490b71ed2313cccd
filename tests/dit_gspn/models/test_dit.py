"""dit_gspn.models.dit, the DiT backbone: local and global scans per layer, adaLN-Zero, shapes and resolutions, CFG,
checkpointing, compile, save/load, errors, and a forward that never reads a tensor on the host."""
import json
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dit_gspn.models import DiT
from dit_gspn.registry import UnknownNameError
from dit_gspn.models.attention import Attention


TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=4, num_classes=10)
MIXERS = ["gspn", "attention"]


def tiny(mixer="gspn", **overrides) -> DiT:
    return DiT(**{**TINY, "mixer": mixer, **overrides})


def randomise(model: DiT, std=0.2) -> DiT:
    """Random weights everywhere, so that adaLN-Zero does not make every output 0."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(std * torch.randn_like(p))
    return model


def inputs(B=2, C=4, H=8, W=8, num_classes=10):
    return torch.randn(B, C, H, W), torch.randint(0, 1000, (B,)), torch.randint(0, num_classes, (B,))


def test_local_and_global_scans_per_layer():
    model = tiny(depth=5, mixer_kwargs=dict(chunk=3, global_layers=2))
    assert [b.mixer.chunk for b in model.blocks] == [3, 3, 3, None, None]
    assert [b.mixer.chunk for b in tiny(depth=8).blocks] == [8] * 6 + [None] * 2  # default: last depth // 4
    assert all(b.mixer.chunk is None for b in tiny(mixer_kwargs=dict(chunk=None)).blocks)
    model = tiny(mixer_kwargs=dict(gate_groups=4, proxy_ratio=8))
    assert model.blocks[0].mixer.gate_groups == 4 and model.blocks[0].mixer.proxy_dim == 4


# ----------------------------------------------------------------------------- adaLN-Zero


@pytest.mark.parametrize("mixer", MIXERS)
def test_adaln_zero_outputs_zero_at_init_and_gradients_reach_every_parameter(mixer):
    """At init only the final linear gets a gradient (everything upstream is multiplied by its zero
    weight or by zero adaLN gates, as in DiT); after two SGD steps every parameter has had one."""
    model = tiny(mixer).train()
    x, t, y = inputs()
    assert torch.equal(model(x, t, y), torch.zeros(2, 8, 8, 8))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    target = torch.randn(2, 8, 8, 8)
    reached = []
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x, t, y), target).backward()
        reached.append({n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0})
        opt.step()
    assert reached[0] == {"final_layer.linear.weight", "final_layer.linear.bias"}
    assert set().union(*reached) == {n for n, _ in model.named_parameters()}


# ----------------------------------------------------------------------------- shapes and resolutions


@pytest.mark.parametrize("mixer", MIXERS)
@pytest.mark.parametrize("patch_size", [1, 2, 4, 8])
def test_square_and_non_square_inputs_for_every_patch_size(mixer, patch_size):
    model = randomise(tiny(mixer, patch_size=patch_size, input_size=2 * patch_size, depth=1)).eval()
    for H, W in [(2 * patch_size, 2 * patch_size), (2 * patch_size, 3 * patch_size), (3 * patch_size, patch_size)]:
        out = model(*inputs(H=H, W=W))
        assert out.shape == (2, 8, H, W) and torch.isfinite(out).all()


@pytest.mark.parametrize("mixer", MIXERS)
def test_non_square_token_layout_round_trips(mixer):
    """With no blocks each output patch depends on its own input patch only: a wrong (h, w) order breaks it."""
    model = randomise(tiny(mixer, depth=0)).eval()
    x, t, y = inputs(H=6, W=10)
    poked = x.clone()
    poked[:, :, 2:4, 6:8] += 1.0  # patch (row 1, column 3)
    changed = (model(poked, t, y) - model(x, t, y)).abs().sum(dim=(0, 1)) > 0
    expected = torch.zeros(6, 10, dtype=torch.bool)
    expected[2:4, 6:8] = True
    assert torch.equal(changed, expected)


def test_gspn_trained_at_one_size_runs_at_another():
    model = tiny("gspn", input_size=8)
    assert model.pos_embed is None and "pos_embed" not in model.state_dict()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        x, t, y = inputs(H=8, W=8)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x, t, y), torch.randn(2, 8, 8, 8)).backward()
        opt.step()
    model.eval()
    for H, W in [(16, 16), (12, 20)]:
        out = model(*inputs(H=H, W=W))
        assert out.shape == (2, 8, H, W) and torch.isfinite(out).all() and out.abs().sum() > 0


def test_attention_pos_embed_is_recomputed_for_another_grid():
    from dit_gspn.models import sincos_pos_embed_2d

    model = randomise(tiny("attention")).eval()
    assert torch.equal(model.positional_embedding((4, 4), torch.float32, "cpu"), model.pos_embed)
    torch.testing.assert_close(model.positional_embedding((3, 6), torch.float32, "cpu")[0],
                               sincos_pos_embed_2d(32, 3, 6))
    out = model(*inputs(H=6, W=12))
    assert out.shape == (2, 8, 6, 12) and torch.isfinite(out).all()


def test_non_square_training_size_round_trips_through_config_json(tmp_path):
    model = randomise(tiny("attention", input_size=(8, 12))).eval()
    assert model.input_size == (8, 12) and model.pos_embed.shape == (1, 4 * 6, 32)
    model.save_pretrained(tmp_path)
    loaded = DiT.from_pretrained(tmp_path).eval()
    assert loaded.input_size == (8, 12)
    x, t, y = inputs(H=8, W=12)
    torch.testing.assert_close(loaded(x, t, y), model(x, t, y), rtol=0, atol=0)


def test_learn_sigma_off_and_scalar_timestep():
    model = tiny(learn_sigma=False)
    x, _, y = inputs()
    assert model.out_channels == 4 and model(x, torch.tensor(10), y).shape == (2, 4, 8, 8)
    assert model.input_size == 8


# ----------------------------------------------------------------------------- conditioning


def test_label_dropout_uses_the_null_class_num_classes():
    model = randomise(tiny(class_dropout_prob=1.0))
    labels = torch.tensor([0, 3, 9])
    null = model.y_embedder.embedding_table.weight[10]
    assert torch.equal(model.y_embedder(labels, train=True), null.expand(3, -1))
    forced = model.y_embedder(labels, train=False, force_drop_ids=torch.tensor([1, 0, 1]))
    assert torch.equal(forced[0], null) and torch.equal(forced[2], null)
    assert torch.equal(forced[1], model.y_embedder.embedding_table.weight[3])
    assert torch.equal(model.y_embedder(labels, train=False), model.y_embedder.embedding_table.weight[labels])


@pytest.mark.parametrize("guided_channels", [None, 3])
def test_forward_with_cfg_guides_the_epsilon_channels(guided_channels):
    model = randomise(tiny()).eval()
    x, _, _ = inputs(B=4)
    t = torch.tensor([5, 9, 5, 9])
    y = torch.tensor([1, 2, 10, 10])
    out = model.forward_with_cfg(x, t, y, cfg_scale=4.0, guided_channels=guided_channels)
    raw = model(torch.cat([x[:2], x[:2]]), t, y)
    k = 4 if guided_channels is None else 3
    guided = raw[2:, :k] + 4.0 * (raw[:2, :k] - raw[2:, :k])
    torch.testing.assert_close(out[:2, :k], guided)
    torch.testing.assert_close(out[2:, :k], guided)
    torch.testing.assert_close(out[:, k:], raw[:, k:])
    with pytest.raises(ValueError, match="odd batch size 3"):
        model.forward_with_cfg(x[:3], t[:3], y[:3], cfg_scale=4.0)


# ----------------------------------------------------------------------------- training machinery


def test_gradient_checkpointing_gives_the_same_output_and_gradients():
    model = randomise(tiny()).train()
    x, t, y = inputs()
    torch.manual_seed(1)  # the same label dropout in both runs
    model(x, t, y).square().mean().backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    calls = []

    def counting_checkpoint(module, *args):
        calls.append(module)
        return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False)

    model.enable_gradient_checkpointing(counting_checkpoint)
    torch.manual_seed(1)
    model(x, t, y).square().mean().backward()
    assert len(calls) == len(model.blocks)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, plain[n], msg=n)
    model.disable_gradient_checkpointing()
    assert not model.gradient_checkpointing


@pytest.mark.slow
def test_torch_compile_matches_eager_on_cpu():
    import torch._inductor.config

    model = randomise(DiT(input_size=4, patch_size=1, in_channels=2, hidden_size=16, depth=1, num_heads=2,
                          num_classes=3, mixer_kwargs=dict(chunk=2, global_layers=0))).eval()
    x, t, y = torch.randn(2, 2, 4, 4), torch.tensor([3, 700]), torch.tensor([0, 3])
    compiled = torch.compile(model, fullgraph=True)  # fullgraph: the scan op must trace, not break the graph
    # One compile worker: on CI's 2 cores a pool of compile workers only adds start-up time.
    with torch.no_grad(), torch._inductor.config.patch(compile_threads=1):
        torch.testing.assert_close(compiled(x, t, y), model(x, t, y), rtol=1e-4, atol=1e-4)


def test_bf16_autocast_stays_close_to_float32():
    model = randomise(tiny()).eval()
    x, t, y = inputs()
    with torch.no_grad():
        ref = model(x, t, y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x, t, y)
    assert (low.float() - ref).abs().max() < 0.05 * ref.abs().max()


@pytest.mark.parametrize("mixer", MIXERS)
def test_save_pretrained_writes_safetensors_and_json_and_reloads_without_pickles(mixer, tmp_path):
    model = randomise(tiny(mixer, mixer_kwargs=dict(gate_groups=8) if mixer == "gspn" else None)).eval()
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "diffusion_pytorch_model.safetensors"]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["mixer"] == mixer and config["hidden_size"] == 32 and config["mixer_kwargs"] == ({"gate_groups": 8} if mixer == "gspn" else None)
    loaded = DiT.from_pretrained(tmp_path).eval()
    x, t, y = inputs()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, y), model(x, t, y), rtol=0, atol=0)


def test_a_config_json_from_before_group_lam_u_loads_with_the_defaults_of_its_time(tmp_path):
    """A checkpoint written when DiT's constructor took gspn_* arguments and had no gspn_group_lam_u: its
    config.json names gate groups but not lam's and u's grouping, which were per channel then, as was the
    default proxy_ratio 16 and (for any key absent) the other defaults of that constructor."""
    old_mixer = dict(chunk=8, global_layers=None, proxy_ratio=16, gate_groups=8, group_lam_u=False, dwconv=True,
                     skip=True, output_gate=True)  # what that constructor built for gspn_gate_groups=8
    model = randomise(tiny(mixer_kwargs=old_mixer)).eval()
    model.save_pretrained(tmp_path)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    C, proxy = 32, 32 // 16
    assert shapes["blocks.0.gspn.lam_proj.weight"] == shapes["blocks.0.gspn.u_proj.weight"] == (4 * C, proxy)
    assert shapes["blocks.0.gspn.merge"] == (4, C) and shapes["blocks.0.gspn.gate_proj.weight"] == (3 * 4 * 8, proxy)
    config = json.loads((tmp_path / "config.json").read_text())
    for key in ("mixer_kwargs", "drop_path"):  # arguments that constructor did not have
        del config[key]
    config.update(gspn_chunk=8, gspn_global_layers=None, gspn_proxy_ratio=16, gspn_gate_groups=8, gspn_dwconv=True,
                  gspn_skip=True, gspn_output_gate=True)
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = DiT.from_pretrained(tmp_path).eval()
    assert loaded.config.mixer_kwargs == old_mixer
    x, t, y = inputs()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, y), model(x, t, y), rtol=0, atol=0)


# ----------------------------------------------------------------------------- errors


def test_clear_errors_for_bad_inputs():
    model = tiny()
    x, t, y = inputs()
    with pytest.raises(ValueError, match=r"input size H x W = 9 x 8 is not divisible by the patch size 2"):
        model(torch.randn(2, 4, 9, 8), t, y)
    with pytest.raises(TypeError, match=r"class labels must be an integer tensor, got dtype torch.float32"):
        model(x, t, y.float())
    with pytest.raises(ValueError, match=r"expected x of shape \(B, 4, H, W\), got \(2, 3, 8, 8\)"):
        model(torch.randn(2, 3, 8, 8), t, y)
    with pytest.raises(ValueError, match=r"expected t and y of shape \(2,\).*got t \(3,\)"):
        model(x, torch.tensor([1, 2, 3]), y)
    with pytest.raises(ValueError, match="input_size 10 is not divisible by patch_size 4"):
        tiny(input_size=10, patch_size=4)
    with pytest.raises(UnknownNameError, match="unknown mixer 'mamba'.*choose one of gspn, attention"):
        tiny(mixer="mamba")
    with pytest.raises(ValueError, match=r"input_size must be an int or an \(H, W\) pair of ints, got \(8, 8, 8\)"):
        tiny(input_size=(8, 8, 8))
    with pytest.raises(ValueError, match=r"input_size must be at least 1 on each side, got \(0, 8\)"):
        tiny(input_size=(0, 8))
    with pytest.raises(ValueError, match=r"grid \(h, w\) = \(2, 2\) holds 4 tokens but the input has N = 6"):
        Attention(8, 2)(torch.randn(1, 6, 8), (2, 2))


class _FailOnHostRead(TorchDispatchMode):
    """Fails where a device tensor's value would be copied to the host (``.item()``, ``int()``, ``bool()``: all
    of them are ``aten._local_scalar_dense``), which on a GPU makes the host wait for the device."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            raise AssertionError("a tensor's value was read on the host")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("mixer", MIXERS)
def test_forward_never_reads_a_tensor_value_on_the_host(mixer):
    model = randomise(tiny(mixer))
    x, t, y = inputs()
    with pytest.raises(AssertionError, match="read on the host"), _FailOnHostRead():
        int(torch.tensor(3))  # the check sees a host read
    with _FailOnHostRead():
        model(x, t, y).sum().backward()  # training: label dropout, the scan's autograd
        model.eval()
        model.forward_with_cfg(x, t, torch.cat([y[:1], torch.tensor([10])]), cfg_scale=2.0)


@pytest.mark.parametrize("mixer", MIXERS)
def test_forward_traces_into_one_graph(mixer):
    """torch.compile traces the whole forward with no graph break (fullgraph), in both mixers."""
    model = randomise(tiny(mixer)).eval()
    x, t, y = inputs()
    compiled = torch.compile(model, backend="eager", fullgraph=True)  # trace only: inductor is the slow test's
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, t, y), model(x, t, y))


@pytest.mark.cuda
@pytest.mark.parametrize("mixer", MIXERS)
def test_cuda_model_matches_cpu_and_trains_under_bf16_autocast(mixer, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # fp32 convolutions for the comparison
    model = randomise(tiny(mixer, input_size=16, depth=3, mixer_kwargs=dict(chunk=3) if mixer == "gspn" else None)).eval()
    x, t, y = inputs(H=16, W=24)
    with torch.no_grad():
        expected = model(x, t, y)
        got = model.cuda()(x.cuda(), t.cuda(), y.cuda()).cpu()
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-4)
    model.train()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(x.cuda(), t.cuda(), y.cuda()).float().square().mean()
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
