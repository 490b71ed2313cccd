"""Inputs for gspn_scan (x and the five per-direction gate tensors) and the comparison with the float64 reference
that the kernel tests and the op's own tests share."""
import torch

from dit_gspn.ops import gspn_scan
from dit_gspn.ops.reference import gspn_scan_reference


GATES = ("lam", "gl", "gc", "gr", "u")


def make_inputs(B, C, H, W, groups=None, dtype=torch.float32, device="cpu", requires_grad=False):
    """Random x and per-direction tensors (B, 4, G_k, H, W); groups: one G per gate tensor (default C)."""
    groups = groups or (C,) * 5
    x = torch.randn(B, C, H, W, dtype=torch.float64)
    lam = torch.rand(B, 4, groups[0], H, W, dtype=torch.float64) * 0.8 + 0.2
    logits = [torch.randn(B, 4, g, H, W, dtype=torch.float64) * 1.5 for g in groups[1:4]]
    u = torch.randn(B, 4, groups[4], H, W, dtype=torch.float64)
    tensors = [x, lam, *logits, u]
    return [t.to(device=device, dtype=dtype).requires_grad_(requires_grad) for t in tensors]


def reference_with_grads(inputs, chunk, grad_y):
    """Float64 reference output and gradients of <y, grad_y> for the given inputs."""
    leaves = [t.detach().double().requires_grad_() for t in inputs]
    y = gspn_scan_reference(*leaves, chunk=chunk)
    # Gates the reference never reads (one-pixel-wide maps, chunk=1) have zero gradients.
    grads = torch.autograd.grad(y, leaves, grad_y.double(), allow_unused=True)
    return y.detach(), [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads)]


def fused_with_grads(inputs, chunk, grad_y, impl):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    y = gspn_scan(*leaves, chunk=chunk, impl=impl)
    grads = torch.autograd.grad(y, leaves, grad_y)
    return y.detach(), grads


def assert_close_scaled(actual, expected, tol, what):
    """max |actual - expected| <= tol * max(max |expected|, 1): a dtype-sized error relative to the data's scale.

    The scale's floor of 1 (the inputs are O(1)) covers gradients that are mathematically zero,
    e.g. the gates of a one-pixel-wide map, where every normalised weight is a constant.
    """
    err = (actual.double() - expected.double()).abs().max().item()
    scale = max(expected.double().abs().max().item(), 1.0)
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol} * scale {scale:.3g}"


TOLERANCE = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 2e-2}


SHAPES = [
    # (B, C, H, W, groups (lam, gl, gc, gr, u), chunk)
    (2, 3, 5, 7, None, None),
    (1, 4, 7, 4, (2, 4, 1, 2, 4), 2),  # H != W, mixed G in {1, C/2, C}
    (1, 2, 1, 6, None, None),  # H = 1
    (1, 2, 6, 1, (1, 1, 1, 1, 1), 3),  # W = 1, G = 1
    (2, 6, 9, 9, (2, 3, 6, 1, 3), 4),  # odd square, chunked, G in {1, 2, 3, 6}
    (1, 4, 3, 11, (4, 4, 4, 4, 4), 1),  # chunk = 1: every step restarts
    (1, 2, 12, 10, (1, 2, 1, 2, 1), 5),  # chunk not dividing either side
]
