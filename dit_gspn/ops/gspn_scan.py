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
  with autograd and fake-tensor registrations, so ``torch.compile(fullgraph=True)`` traces them;
- ``None``: the fused kernel of the tensors' device, or ``"composed"`` when it cannot be built
  (the extension loader then warns once, naming the cause).

To force one implementation everywhere ``impl=None`` is used (the model's mixer, for the fused
against composed benchmark) without touching the model, use the context manager
``with gspn_scan_impl("composed"): ...`` or set ``DIT_GSPN_SCAN_IMPL=composed`` before import.
An explicit ``impl=`` argument wins over both.
"""
from __future__ import annotations

import contextlib
import numbers
import os

import torch

from . import extension
from .line_scan import line_scan
from .reference import gspn_scan_reference, line_scan_reference

IMPLS = ("reference", "composed", "cpu", "cuda")
#: Environment variable read once at import: the implementation used where ``impl=None``.
IMPL_ENV = "DIT_GSPN_SCAN_IMPL"
#: The CUDA kernel stages one lane vector per tensor in shared memory; lines longer than this
#: (max(H, W)) go to the composed path under ``impl=None`` and are an error under ``impl="cuda"``.
CUDA_MAX_LANES = 2048
#: The dtypes the CUDA kernel computes; others (float64) go to the composed path under ``impl=None``.
CUDA_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_GATE_NAMES = ("lam", "gl", "gc", "gr", "u")


def _impl_from_env() -> str | None:
    value = os.environ.get(IMPL_ENV) or None
    if value is not None and value not in IMPLS:
        raise ValueError(f"{IMPL_ENV}={value!r} is not an implementation; expected one of {IMPLS}")
    return value


_forced_impl: str | None = _impl_from_env()


@contextlib.contextmanager
def gspn_scan_impl(impl: str | None):
    """Within the block, ``gspn_scan(..., impl=None)`` uses ``impl`` (None restores the automatic choice).

    Example: ``with gspn_scan_impl("composed"): model(x, t, y)`` runs the model's mixers on the
    unfused ops. Under ``torch.compile`` the choice is read when the graph is traced.
    """
    global _forced_impl
    if impl is not None and impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS} or None, got {impl!r}")
    previous, _forced_impl = _forced_impl, impl
    try:
        yield
    finally:
        _forced_impl = previous


def gspn_scan(x, lam, gl, gc, gr, u, chunk: int | None = None, impl: str | None = None):
    """Four-direction GSPN propagation, gated by u and summed: (B, C, H, W) -> (B, C, H, W).

    x: (B, C, H, W). lam, gl, gc, gr, u: (B, 4, G, H, W) each, with its own G dividing C
    (channel c uses group c // (C // G)); dim 1 is (top-down, bottom-up, left-right,
    right-left). gl, gc, gr are raw logits (normalised inside). ``chunk=k`` restarts every
    direction's scan every k steps along its scan axis; None scans the whole map. Gradients
    flow to all six tensors (grouped ones get the sum over their channels).
    """
    _check_inputs(x, (lam, gl, gc, gr, u), chunk)
    impl = _resolve_impl(x, impl)
    chunk = None if chunk is None else int(chunk)
    if impl == "reference":
        return gspn_scan_reference(x, lam, gl, gc, gr, u, chunk, line_scan=line_scan_reference)
    if impl == "composed":
        return gspn_scan_reference(x, lam, gl, gc, gr, u, chunk, line_scan=line_scan)
    return torch.ops.gspn.gspn_scan_fwd(x, lam, gl, gc, gr, u, 0 if chunk is None else chunk)


def _check_inputs(x, gates, chunk) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"gspn_scan: x must be a (B, C, H, W) tensor, got {_describe(x)}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"gspn_scan: x must be floating point, got {x.dtype}")
    B, C, H, W = x.shape
    for name, t in zip(_GATE_NAMES, gates):
        if not isinstance(t, torch.Tensor) or t.dim() != 5 or t.shape[0] != B or t.shape[1] != 4 or t.shape[3:] != (H, W):
            raise ValueError(
                f"gspn_scan: {name} must be (B, 4, G, H, W) = ({B}, 4, G, {H}, {W}) to match x {tuple(x.shape)}, "
                f"got {_describe(t)}"
            )
        if t.shape[2] < 1 or C % t.shape[2] != 0:
            raise ValueError(f"gspn_scan: {name}'s group count G={t.shape[2]} must divide the channel count C={C}")
        if t.dtype != x.dtype:
            raise TypeError(f"gspn_scan: {name} has dtype {t.dtype} but x has {x.dtype}; cast them to one dtype")
        if t.device != x.device:
            raise ValueError(f"gspn_scan: {name} is on {t.device} but x is on {x.device}")
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, numbers.Integral) or chunk < 1):
        raise ValueError(f"gspn_scan: chunk must be None (global) or an int >= 1, got {chunk!r}")


def _describe(t) -> str:
    return f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else f"a {type(t).__name__}"


def _resolve_impl(x, impl: str | None) -> str:
    if impl is None:
        impl = _forced_impl
    if impl is None:
        device = x.device.type
        if device not in ("cpu", "cuda") or not _kernels_ready(device):
            return "composed"
        if device == "cuda" and (max(x.shape[-2:]) > CUDA_MAX_LANES or x.dtype not in CUDA_DTYPES):
            return "composed"
        return device
    if impl not in IMPLS:
        raise ValueError(f"gspn_scan: impl must be one of {IMPLS} or None, got {impl!r}")
    if impl in ("cpu", "cuda"):
        extension.require_kernels("gspn_scan", impl, x.device, lambda: _kernels_ready(impl), fallback="composed")
        if impl == "cuda" and max(x.shape[-2:]) > CUDA_MAX_LANES:
            raise ValueError(
                f"gspn_scan: the CUDA kernel scans lines of at most {CUDA_MAX_LANES} pixels, got H, W = "
                f"{tuple(x.shape[-2:])}; use impl='composed'"
            )
        if impl == "cuda" and x.dtype not in CUDA_DTYPES:
            raise TypeError(f"gspn_scan: the CUDA kernel computes {CUDA_DTYPES}, got {x.dtype}; use impl='composed'")
    return impl


@torch.compiler.assume_constant_result
def _kernels_ready(device_type: str) -> bool:
    """Whether the fused kernels for ``device_type`` are loaded (builds them on first use)."""
    return extension.load(device_type) and hasattr(torch.ops.gspn, "gspn_scan_fwd")


# ----------------------------------------------------------------------------------------------
# Python side of the custom ops, registered once the compiled library is loaded.


def _fake_forward(x, lam, gl, gc, gr, u, chunk):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _fake_backward(grad_y, x, lam, gl, gc, gr, u, chunk):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (x, lam, gl, gc, gr, u))


def _setup_context(ctx, inputs, output):
    # Only the inputs are saved: the backward recomputes the per-direction hidden states
    # (csrc/cpu/gspn_scan_cpu.cpp explains why), so nothing of size 4 x C is kept.
    x, lam, gl, gc, gr, u, chunk = inputs
    ctx.save_for_backward(x, lam, gl, gc, gr, u)
    ctx.chunk = chunk


def _backward(ctx, grad_y):
    grads = torch.ops.gspn.gspn_scan_bwd(grad_y, *ctx.saved_tensors, ctx.chunk)
    return (*grads, None)


_registered = False


def _register_python_side() -> None:
    global _registered
    if _registered or not hasattr(torch.ops.gspn, "gspn_scan_fwd"):
        return
    torch.library.register_fake("gspn::gspn_scan_fwd")(_fake_forward)
    torch.library.register_fake("gspn::gspn_scan_bwd")(_fake_backward)
    torch.library.register_autograd("gspn::gspn_scan_fwd", _backward, setup_context=_setup_context)
    _registered = True


extension.on_load(_register_python_side)
