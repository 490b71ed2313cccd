"""The fused scan's gate normalisation is stable for any logits: at logits of -1e4..1e4, and where every
sigmoid underflows in float32, the CPU kernel's output and gradients are finite and equal to a float64
oracle that normalises in log space (w_k = softmax over the valid neighbours of log sigmoid(g_k))."""
import pytest
import torch
import torch.nn.functional as F

from dit_gspn.ops import gspn_scan
from dit_gspn.ops.reference import expand_groups, from_scan_frame, line_scan_reference, to_scan_frame


def log_space_weights(gl, gc, gr):
    """float64 (wl, wc, wr): exp(log sigmoid(g_k) - logsumexp_valid(log sigmoid)), wl = 0 at j = 0, wr = 0 at j = W-1."""
    logs = torch.stack([F.logsigmoid(g.double()) for g in (gl, gc, gr)])
    W = gl.shape[-1]
    valid = torch.ones(3, W, dtype=torch.bool)
    valid[0, 0] = False
    valid[2, W - 1] = False
    logs = torch.where(valid.view(3, *([1] * (gl.dim() - 1)), W), logs, torch.tensor(float("-inf"), dtype=torch.float64))
    w = torch.exp(logs - torch.logsumexp(logs, dim=0, keepdim=True))
    return w.unbind(0)


def log_space_gspn_scan(x, lam, gl, gc, gr, u):
    """The four-direction propagation in float64 with log-space normalised gates (the oracle)."""
    C = x.shape[1]
    y = 0
    for d in range(4):
        def frame(t):
            return to_scan_frame(expand_groups(t[:, d], C), d)

        wl, wc, wr = log_space_weights(frame(gl), frame(gc), frame(gr))
        h = line_scan_reference(to_scan_frame(x, d), frame(lam), wl, wc, wr)
        y = y + expand_groups(u[:, d], C) * from_scan_frame(h, d)
    return y


def extreme_logits(B, G, H, W, kind, generator):
    shape = (B, 4, G, H, W)
    if kind == "wide":  # saturated sigmoids on both sides, and every mix of them at one position
        return (torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1) * 1e4
    if kind == "underflow":  # sigmoid(g) is 0 in float32 everywhere: only the softmax limit is defined
        return -120 + 3 * torch.randn(shape, generator=generator, dtype=torch.float64)
    raise ValueError(kind)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("kind", ["wide", "underflow"])
@pytest.mark.parametrize("groups", [(3, 1), (3, 3)], ids=["G=1", "G=C"])
def test_cpu_kernel_normalises_extreme_logits_like_log_space_oracle(kind, groups, dtype):
    C, G = groups
    B, H, W = 2, 5, 6
    gen = torch.Generator().manual_seed({"wide": 10, "underflow": 20}[kind] + G)
    x = torch.randn(B, C, H, W, generator=gen, dtype=torch.float64)
    lam = torch.rand(B, 4, C, H, W, generator=gen, dtype=torch.float64) + 0.5
    u = torch.randn(B, 4, C, H, W, generator=gen, dtype=torch.float64)
    logits = [extreme_logits(B, G, H, W, kind, gen) for _ in range(3)]
    inputs = [t.to(dtype) for t in (x, lam, *logits, u)]
    if kind == "underflow" and dtype == torch.float32:
        assert torch.sigmoid(inputs[2]).max() == 0  # the case the plain sigmoid / sum cannot normalise

    leaves = [t.clone().requires_grad_() for t in inputs]
    y = gspn_scan(*leaves, impl="cpu")
    grad_y = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    grads = torch.autograd.grad(y, leaves, grad_y.to(dtype))

    oracle_leaves = [t.detach().double().requires_grad_() for t in inputs]
    y_ref = log_space_gspn_scan(*oracle_leaves)
    grads_ref = torch.autograd.grad(y_ref, oracle_leaves, grad_y)

    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.double(), y_ref, rtol=tol, atol=tol * y_ref.abs().max().item())
    for name, g, g_ref in zip(("x", "lam", "gl", "gc", "gr", "u"), grads, grads_ref):
        assert torch.isfinite(g).all(), f"d{name} is not finite"
        scale = max(g_ref.abs().max().item(), 1.0)
        err = (g.double() - g_ref).abs().max().item()
        assert err <= tol * scale, f"d{name}: max error {err:.3g} > {tol} * {scale:.3g}"


def test_underflow_case_is_not_trivial():
    """The softmax limit at logits around -120 spreads weight over the neighbours (not one-hot), so the
    test above checks real weights and their gradients."""
    gen = torch.Generator().manual_seed(0)
    g = [extreme_logits(1, 1, 4, 6, "underflow", gen)[:, 0] for _ in range(3)]
    wl, wc, wr = log_space_weights(*g)
    interior = torch.stack([wl, wc, wr])[..., 1:-1]
    assert 0.05 < interior.max(dim=0).values.mean() < 0.95
    torch.testing.assert_close(wl + wc + wr, torch.ones_like(wl, dtype=torch.float64))
