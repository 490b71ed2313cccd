"""The scans on gates normalised from extreme logits (-1e4 to +1e4): line_scan and gspn_scan, through every
implementation that runs on the CPU (the compiled kernel included), stay finite and equal the float64 reference
fed the 60-digit oracle's weights (helpers.gate_oracle), forward and backward."""
import pytest
import torch

from dit_gspn.ops import gspn_scan, line_scan, normalize_gates
from dit_gspn.ops.reference import gspn_scan_reference, line_scan_reference

from helpers.gate_oracle import KINDS, close, extreme_logits, oracle_logit_grads, oracle_weights


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
