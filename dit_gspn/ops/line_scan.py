"""``line_scan``: the GSPN row scan, dispatched to the compiled CPU/CUDA kernel or the PyTorch reference.

The compiled kernels are the torch custom ops ``gspn::line_scan_fwd`` and ``gspn::line_scan_bwd``. This
module defines them (schemas, fake tensors, autograd for all five inputs) when it is imported; the kernels
in ``csrc/`` attach to them when the library is loaded. So ``torch.compile(fullgraph=True)`` traces through
:func:`line_scan`.
"""
from __future__ import annotations

import numbers

import torch

from . import dispatch
from .reference import line_scan_reference

#: The implementations ``line_scan(..., impl=...)`` accepts.
IMPLS = dispatch.OPS["line_scan"].impls

_ARG_NAMES = ("x", "lam", "wl", "wc", "wr")


def line_scan(x, lam, wl, wc, wr, chunk: int | None = None, impl: str | None = None):
    """h[i, j] = wl h[i-1, j-1] + wc h[i-1, j] + wr h[i-1, j+1] + lam x, scanning along dim -2.

    Args:
        x, lam, wl, wc, wr: tensors of one shape (..., H, W), one device and one floating dtype;
            any strides. Out-of-range neighbours are zero; row 0 is ``lam * x``.
        chunk: restart the recurrence every ``chunk`` rows (rows i with i % chunk == 0 are
            ``lam * x``); None scans the whole height.
        impl: "reference" (pure PyTorch), "cpu" or "cuda" (the compiled kernels; must match
            the tensors' device). None picks the compiled kernel of the tensors' device when it
            builds, can run (rows of at most dispatch.CUDA_MAX_LANES on CUDA) and passed its
            self-check on this device, else the reference (a build failure or a failed check is
            named once in a warning); dit_gspn.ops.dispatch decides.

    Returns:
        h, contiguous, of the inputs' shape and dtype. Differentiable in all five inputs;
        half-precision inputs are computed in float32.
    """
    tensors = (x, lam, wl, wc, wr)
    _check_args(tensors, chunk)
    impl = dispatch.resolve_impl("line_scan", tensors, impl)
    if impl == "reference":
        return line_scan_reference(x, lam, wl, wc, wr, chunk)
    return torch.ops.gspn.line_scan_fwd(x, lam, wl, wc, wr, int(chunk or 0))


def _check_args(tensors, chunk) -> None:
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, numbers.Integral) or chunk < 1):
        raise ValueError(f"line_scan: chunk must be an int >= 1 or None, got {chunk!r}")
    for name, t in zip(_ARG_NAMES, tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"line_scan: {name} must be a torch.Tensor, got {type(t).__name__}")
    x = tensors[0]
    if x.dim() < 2:
        raise ValueError(f"line_scan: x must have shape (..., H, W), got {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"line_scan: inputs must be floating point, got x of dtype {x.dtype}")
    for name, t in zip(_ARG_NAMES[1:], tensors[1:]):
        if t.shape != x.shape:
            raise ValueError(f"line_scan: {name} has shape {tuple(t.shape)} but x has shape {tuple(x.shape)}")
        if t.device != x.device:
            raise ValueError(f"line_scan: {name} is on {t.device} but x is on {x.device}")
        if t.dtype != x.dtype:
            raise TypeError(f"line_scan: {name} has dtype {t.dtype} but x has dtype {x.dtype}")


# --- the custom ops: schemas, fake tensors and autograd, defined at import ------------------------

# chunk = 0 runs the whole height. The backward returns (dx, dlam, dwl, dwc, dwr) from grad_h and the forward's h.
torch.library.define("gspn::line_scan_fwd", "(Tensor x, Tensor lam, Tensor wl, Tensor wc, Tensor wr, int chunk) -> Tensor")
torch.library.define("gspn::line_scan_bwd", "(Tensor grad_h, Tensor h, Tensor x, Tensor lam, Tensor wl, Tensor wc, "
                     "Tensor wr, int chunk) -> (Tensor, Tensor, Tensor, Tensor, Tensor)")


@torch.library.register_fake("gspn::line_scan_fwd")
def _fake_fwd(x, lam, wl, wc, wr, chunk):
    return x.new_empty(x.shape)


@torch.library.register_fake("gspn::line_scan_bwd")
def _fake_bwd(grad_h, h, x, lam, wl, wc, wr, chunk):
    return tuple(x.new_empty(x.shape) for _ in range(5))


def _setup_context(ctx, inputs, output):
    x, lam, wl, wc, wr, chunk = inputs
    ctx.save_for_backward(output, x, lam, wl, wc, wr)
    ctx.chunk = chunk


def _backward(ctx, grad_h):
    h, x, lam, wl, wc, wr = ctx.saved_tensors
    grads = torch.ops.gspn.line_scan_bwd(grad_h, h, x, lam, wl, wc, wr, ctx.chunk)
    return (*grads, None)


torch.library.register_autograd("gspn::line_scan_fwd", _backward, setup_context=_setup_context)
