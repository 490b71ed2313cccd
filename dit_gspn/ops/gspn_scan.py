"""The fused four-direction GSPN propagation: ``gspn_scan`` and the choice of its implementation.

``gspn_scan(x, lam, gl, gc, gr, u, chunk=None, impl=None)`` computes exactly
:func:`dit_gspn.ops.reference.gspn_scan_reference`: raw gate logits in, normalisation inside,
the four directions (top-down, bottom-up, left-right, right-left) read from the original
layout, each gated by its ``u`` and summed. Implementations (``impl``):

- ``"reference"``: the composition of ``normalize_gates`` and ``line_scan_reference`` (the oracle);
- ``"composed"``: the same composition through the dispatching :func:`dit_gspn.ops.line_scan`
  (the unfused baseline: materialised flips/transposes, normalised gates, four scans);
- ``"cpu"`` / ``"cuda"``: the fused compiled kernels (``csrc/cpu/gspn_scan_cpu.cpp``,
  ``csrc/cuda/gspn_scan_cuda.cu``), torch custom ops ``gspn::gspn_scan_fwd`` / ``gspn_scan_bwd``
  whose schemas, autograd and fake tensors this module defines, so ``torch.compile(fullgraph=True)``
  traces them;
- ``None``: the fused kernel of the tensors' device, or ``"composed"`` where it cannot run or is not
  trusted (it did not build, or disagreed with the reference in its self-check on this device: a warning
  says so once; on CUDA, float64 or lines longer than ``dispatch.CUDA_MAX_LANES``).
  :mod:`dit_gspn.ops.dispatch` decides, as for line_scan.

To force one implementation everywhere ``impl=None`` is used (the model's mixer, for the fused
against composed benchmark) without touching the model, use the context manager
``with gspn_scan_impl("composed"): ...`` (:func:`dit_gspn.ops.dispatch.scan_impl`) or set
``DIT_GSPN_SCAN_IMPL=composed`` before import. An explicit ``impl=`` argument wins over both.
"""
from __future__ import annotations

import numbers

import torch

from . import dispatch
from .dispatch import IMPL_ENV, scan_impl as gspn_scan_impl  # noqa: F401 -- the names callers import from here
from .line_scan import line_scan
from .reference import gspn_scan_reference, line_scan_reference

IMPLS = dispatch.OPS["gspn_scan"].impls
_GATE_NAMES = ("lam", "gl", "gc", "gr", "u")


def gspn_scan(x, lam, gl, gc, gr, u, chunk: int | None = None, impl: str | None = None):
    """Four-direction GSPN propagation, gated by u and summed: (B, C, H, W) -> (B, C, H, W).

    x: (B, C, H, W), contiguous or channels-last (a (B, N, C) token tensor viewed as a map: the compiled
    ops then return y, and x's gradient, channels-last too, and on the CPU, where lam, gl, gc, gr and u share
    one G of at least 8 channels per group, run a kernel vectorised over each group's channels with no
    layout copy). lam, gl, gc, gr, u: (B, 4, G, H, W) each, with its own G dividing C
    (channel c uses group c // (C // G)); dim 1 is (top-down, bottom-up, left-right,
    right-left). gl, gc, gr are raw logits (normalised inside). ``chunk=k`` restarts every
    direction's scan every k steps along its scan axis; None scans the whole map. Gradients
    flow to all six tensors (grouped ones get the sum over their channels).
    """
    check_inputs(x, (lam, gl, gc, gr, u), chunk)
    impl = dispatch.resolve_impl("gspn_scan", (x, lam, gl, gc, gr, u), impl)
    chunk = None if chunk is None else int(chunk)
    if impl == "reference":
        return gspn_scan_reference(x, lam, gl, gc, gr, u, chunk, line_scan=line_scan_reference)
    if impl == "composed":
        return gspn_scan_reference(x, lam, gl, gc, gr, u, chunk, line_scan=line_scan)
    return torch.ops.gspn.gspn_scan_fwd(x, lam, gl, gc, gr, u, 0 if chunk is None else chunk)


def check_inputs(x, gates, chunk) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"gspn_scan: x must be a (B, C, H, W) tensor, got {describe(x)}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"gspn_scan: x must be floating point, got {x.dtype}")
    B, C, H, W = x.shape
    for name, t in zip(_GATE_NAMES, gates):
        if not isinstance(t, torch.Tensor) or t.dim() != 5 or t.shape[0] != B or t.shape[1] != 4 or t.shape[3:] != (H, W):
            raise ValueError(
                f"gspn_scan: {name} must be (B, 4, G, H, W) = ({B}, 4, G, {H}, {W}) to match x {tuple(x.shape)}, "
                f"got {describe(t)}"
            )
        if t.shape[2] < 1 or C % t.shape[2] != 0:
            raise ValueError(f"gspn_scan: {name}'s group count G={t.shape[2]} must divide the channel count C={C}")
        if t.dtype != x.dtype:
            raise TypeError(f"gspn_scan: {name} has dtype {t.dtype} but x has {x.dtype}; cast them to one dtype")
        if t.device != x.device:
            raise ValueError(f"gspn_scan: {name} is on {t.device} but x is on {x.device}")
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, numbers.Integral) or chunk < 1):
        raise ValueError(f"gspn_scan: chunk must be None (global) or an int >= 1, got {chunk!r}")


def describe(t) -> str:
    return f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else f"a {type(t).__name__}"


# ----------------------------------------------------------------------------------------------
# The custom ops: schemas, fake tensors and autograd, defined at import (the kernels attach when loaded).

# Every gate tensor (B, 4, G, H, W); gl, gc, gr raw logits; chunk = 0 scans the whole map. The backward returns
# (dx, dlam, dgl, dgc, dgr, du) from grad_y and the forward's inputs (it recomputes the states).
torch.library.define("gspn::gspn_scan_fwd",
                     "(Tensor x, Tensor lam, Tensor gl, Tensor gc, Tensor gr, Tensor u, int chunk) -> Tensor")
torch.library.define("gspn::gspn_scan_bwd", "(Tensor grad_y, Tensor x, Tensor lam, Tensor gl, Tensor gc, Tensor gr, "
                     "Tensor u, int chunk) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")


def output_memory_format(x: torch.Tensor) -> torch.memory_format:
    """The layout of the compiled op's y and dx: channels-last where x is (csrc/gspn_scan_checks.h says the same)."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


@torch.library.register_fake("gspn::gspn_scan_fwd")
def _fake_forward(x, lam, gl, gc, gr, u, chunk):
    return torch.empty_like(x, memory_format=output_memory_format(x))


@torch.library.register_fake("gspn::gspn_scan_bwd")
def _fake_backward(grad_y, x, lam, gl, gc, gr, u, chunk):
    d_x = torch.empty_like(x, memory_format=output_memory_format(x))
    return (d_x, *(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (lam, gl, gc, gr, u)))


def _setup_context(ctx, inputs, output):
    # Only the inputs are saved: the backward recomputes the per-direction hidden states
    # (csrc/cpu/gspn_scan_cpu.cpp explains why), so nothing of size 4 x C is kept.
    x, lam, gl, gc, gr, u, chunk = inputs
    ctx.save_for_backward(x, lam, gl, gc, gr, u)
    ctx.chunk = chunk


def _backward(ctx, grad_y):
    grads = torch.ops.gspn.gspn_scan_bwd(grad_y, *ctx.saved_tensors, ctx.chunk)
    return (*grads, None)


torch.library.register_autograd("gspn::gspn_scan_fwd", _backward, setup_context=_setup_context)
