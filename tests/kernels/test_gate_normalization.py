"""Gate normalisation is stable for any finite logits, from -1e4 to +1e4: every implementation that
runs on the CPU equals an oracle that computes sigmoid / sum naively in 60-digit arithmetic (mpmath,
where exp(-1e4) does not underflow), forward and backward. The naive float formula gives 0/0 = NaN
once every sigmoid of a position underflows (logits below about -88 in float32)."""
import mpmath
import numpy as np
import pytest
import torch

from dit_gspn.ops import gspn_scan, line_scan, normalize_gates
from dit_gspn.ops.reference import gspn_scan_reference, line_scan_reference

mpmath.mp.dps = 60


def oracle_weights(gl, gc, gr):
    """Float64 (wl, wc, wr) of normalize_gates, computed as sigmoid / sum in 60 digits."""
    gl, gc, gr = (t.double().numpy() for t in (gl, gc, gr))
    W = gl.shape[-1]
    out = np.zeros((3, *gl.shape))
    for idx in np.ndindex(gl.shape):
        j = idx[-1]
        s = [mpmath.mpf(0) if j == 0 else 1 / (1 + mpmath.exp(-mpmath.mpf(gl[idx]))),
             1 / (1 + mpmath.exp(-mpmath.mpf(gc[idx]))),
             mpmath.mpf(0) if j == W - 1 else 1 / (1 + mpmath.exp(-mpmath.mpf(gr[idx])))]
        total = sum(s)
        for k in range(3):
            out[(k, *idx)] = float(s[k] / total)
    return [torch.from_numpy(w) for w in out]


def oracle_logit_grads(gl, gc, gr, d_w):
    """Float64 gradients of sum_k <d_w[k], w_k> w.r.t. the logits: the quotient rule on sigmoid / sum, in 60 digits."""
    gl, gc, gr = (t.double().numpy() for t in (gl, gc, gr))
    d_w = [t.double().numpy() for t in d_w]
    W = gl.shape[-1]
    out = np.zeros((3, *gl.shape))
    for idx in np.ndindex(gl.shape):
        j = idx[-1]
        mask = [j > 0, True, j < W - 1]
        sig = [1 / (1 + mpmath.exp(-mpmath.mpf(g[idx]))) for g in (gl, gc, gr)]
        s = [sig[k] if mask[k] else mpmath.mpf(0) for k in range(3)]
        total = sum(s)
        dot = sum(s[k] * mpmath.mpf(d_w[k][idx]) for k in range(3)) / total
        for k in range(3):
            if mask[k]:
                out[(k, *idx)] = float(sig[k] * (1 - sig[k]) * (mpmath.mpf(d_w[k][idx]) - dot) / total)
    return [torch.from_numpy(g) for g in out]


def extreme_logits(shape, kind, seed):
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((3, *shape), generator=g, dtype=torch.float64)
    if kind == "ordinary":
        return list(noise * 3)
    if kind == "all-below-float32-underflow":  # -88 .. -120: every float32 sigmoid is 0 or subnormal
        return list(-104 + noise * 8)
    if kind == "all-near-minus-1e4":
        return list(-1e4 + noise * 5)
    if kind == "all-near-plus-1e4":
        return list(1e4 + noise * 5)
    if kind == "mixed-plus-minus-1e4":
        sign = torch.randint(0, 2, (3, *shape), generator=g).double() * 2 - 1
        return list(sign * 1e4 + noise * 5)
    raise ValueError(kind)


KINDS = ["ordinary", "all-below-float32-underflow", "all-near-minus-1e4", "all-near-plus-1e4", "mixed-plus-minus-1e4"]
SHAPE = (2, 3, 5)
TOL = {torch.float64: 1e-12, torch.float32: 2e-6}


def close(actual, expected, tol, what):
    err = (actual.double() - expected).abs().max().item()
    scale = max(expected.abs().max().item(), 1.0)
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol} * {scale:.3g}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_reference_normalize_gates_forward_and_backward(kind, dtype):
    logits = [t.to(dtype).requires_grad_() for t in extreme_logits(SHAPE, kind, 0)]
    weights = normalize_gates(*logits)
    d_w = [torch.randn(SHAPE, dtype=torch.float64) for _ in range(3)]
    grads = torch.autograd.grad(weights, logits, [d.to(dtype) for d in d_w])
    rounded = [t.detach().double() for t in logits]  # the oracle sees the logits the op saw
    for name, w, w_ref in zip(("wl", "wc", "wr"), weights, oracle_weights(*rounded)):
        close(w, w_ref, TOL[dtype], name)
    for name, g, g_ref in zip(("dgl", "dgc", "dgr"), grads, oracle_logit_grads(*rounded, d_w)):
        close(g, g_ref, TOL[dtype], name)


def test_the_naive_formula_is_nan_where_the_stable_one_is_not():
    # The defect being fixed: sigmoid / sum at logits near -1e4.
    gl, gc, gr = (t.float() for t in extreme_logits(SHAPE, "all-near-minus-1e4", 1))
    naive = gc.sigmoid() / (gl.sigmoid() + gc.sigmoid() + gr.sigmoid())
    assert naive.isnan().all()
    assert all(torch.isfinite(w).all() for w in normalize_gates(gl, gc, gr))


@pytest.mark.parametrize("impl", ["reference", "cpu"])
@pytest.mark.parametrize("kind", KINDS)
def test_line_scan_on_normalised_extreme_gates(kind, impl):
    # normalize_gates feeds the line-scan kernels; their composition stays finite and exact.
    shape = (2, 4, 6)
    logits = [t.float().requires_grad_() for t in extreme_logits(shape, kind, 2)]
    x, lam, grad_h = (torch.randn(shape) for _ in range(3))
    h = line_scan(x, lam, *normalize_gates(*logits), impl=impl)
    grads = torch.autograd.grad(h, logits, grad_h)
    rounded = [t.detach().double() for t in logits]
    w_ref = [w.requires_grad_() for w in oracle_weights(*rounded)]
    h_ref = line_scan_reference(x.double(), lam.double(), *w_ref)
    d_w = torch.autograd.grad(h_ref, w_ref, grad_h.double())
    close(h, h_ref, 2e-5, "h")
    for name, g, g_ref in zip(("dgl", "dgc", "dgr"), grads, oracle_logit_grads(*rounded, d_w)):
        close(g, g_ref, 2e-5, name)


GSPN_IMPLS = ["reference", "composed", "cpu"]


@pytest.mark.parametrize("impl", GSPN_IMPLS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("G", [1, 2], ids=["gates-shared-by-all-channels", "gates-per-channel"])
def test_gspn_scan_with_extreme_logits(kind, impl, G):
    B, C, H, W = 1, 2, 4, 5
    g = torch.Generator().manual_seed(3)
    x = torch.randn(B, C, H, W, generator=g)
    lam = torch.rand(B, 4, C, H, W, generator=g)
    u = torch.randn(B, 4, C, H, W, generator=g)
    logits = [t.float() for t in extreme_logits((B, 4, G, H, W), kind, 4)]
    inputs = [t.requires_grad_() for t in (x, lam, *logits, u)]
    grad_y = torch.randn(B, C, H, W, generator=g)
    y = gspn_scan(*inputs, impl=impl)
    grads = torch.autograd.grad(y, inputs, grad_y)
    # Oracle: the float64 reference, whose normalisation the first test holds to the 60-digit one.
    leaves = [t.detach().double().requires_grad_() for t in inputs]
    y_ref = gspn_scan_reference(*leaves, line_scan=line_scan_reference)
    grads_ref = torch.autograd.grad(y_ref, leaves, grad_y.double())
    close(y, y_ref, 2e-5, "y")
    for name, gr_, g_ref in zip(("x", "lam", "gl", "gc", "gr", "u"), grads, grads_ref):
        assert torch.isfinite(gr_).all(), f"d{name} is not finite"
        close(gr_, g_ref, 2e-5, f"d{name}")
