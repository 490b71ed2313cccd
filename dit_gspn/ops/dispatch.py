"""Which implementation runs a scan op: one resolution for every op of ``torch.ops.gspn``.

Each op (``line_scan``, ``gspn_scan``; a new one adds an :class:`OpSpec` to :data:`OPS`) names its
implementations, the fallback that ``impl=None`` takes when the compiled kernel cannot run, the dtypes
its CUDA kernel computes and the dims that are lane axes of its scans. Then, for every op alike:

- :func:`resolve_impl` ``(op, tensors, impl)`` answers the implementation to run: an explicit ``impl``
  is checked (unknown names, a device mismatch, a kernel that did not build, lines longer than
  :data:`CUDA_MAX_LANES` or a dtype the CUDA kernel does not compute are errors naming the way out);
  ``None`` takes the implementation forced by :func:`scan_impl` / ``$DIT_GSPN_SCAN_IMPL`` when the op
  offers it, else the compiled kernel of the tensors' device where it can run, else the op's fallback
  (with one warning when the build failed: :mod:`dit_gspn.ops.extension`).
- :func:`register_op` registers the Python side of a compiled op (fake tensors, autograd) once its
  library is loaded, exactly once per process.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch

from . import extension

#: The longest line (lanes along a scanned row) any CUDA kernel scans: line_scan's kMaxW (512 threads x 4
#: columns) and the shared memory gspn_scan stages one lane vector per tensor in. Longer lines take the
#: op's fallback under ``impl=None`` and are an error under ``impl="cuda"``.
CUDA_MAX_LANES = 2048
#: Environment variable read once at import: the implementation used where ``impl=None``.
IMPL_ENV = "DIT_GSPN_SCAN_IMPL"
COMPILED = ("cpu", "cuda")


@dataclass(frozen=True)
class OpSpec:
    """What the dispatch needs to know of one op."""

    impls: tuple[str, ...]  # every name ``impl=`` accepts
    fallback: str  # what ``impl=None`` runs where the compiled kernel cannot
    compiled_op: str  # the torch.ops.gspn op whose presence means the compiled kernels are loaded
    lane_dims: tuple[int, ...]  # dims of the first tensor that are lane axes of some scan
    cuda_dtypes: tuple[torch.dtype, ...] | None = None  # None: every floating dtype


OPS: dict[str, OpSpec] = {
    "line_scan": OpSpec(("reference", "cpu", "cuda"), "reference", "line_scan_fwd", (-1,)),
    "gspn_scan": OpSpec(("reference", "composed", "cpu", "cuda"), "composed", "gspn_scan_fwd", (-2, -1),
                        (torch.float32, torch.bfloat16, torch.float16)),
}
#: Every implementation some op offers (what :func:`scan_impl` and ``$DIT_GSPN_SCAN_IMPL`` accept).
ALL_IMPLS = tuple(dict.fromkeys(impl for spec in OPS.values() for impl in spec.impls))


def impl_from_env() -> str | None:
    """The implementation ``$DIT_GSPN_SCAN_IMPL`` forces, or None; an unknown name is an error naming the variable."""
    value = os.environ.get(IMPL_ENV) or None
    if value is not None and value not in ALL_IMPLS:
        raise ValueError(f"{IMPL_ENV}={value!r} is not an implementation; expected one of {ALL_IMPLS}")
    return value


_forced_impl: str | None = impl_from_env()


@contextlib.contextmanager
def scan_impl(impl: str | None):
    """Within the block, every scan op called with ``impl=None`` that offers ``impl`` runs it (ops that do not,
    e.g. line_scan for "composed", keep their automatic choice); None restores the automatic choice.

    Example: ``with scan_impl("composed"): model(x, t, y)`` runs the model's mixers on the unfused ops.
    An explicit ``impl=`` argument wins. Under ``torch.compile`` the choice is read when the graph is traced.
    """
    global _forced_impl
    if impl is not None and impl not in ALL_IMPLS:
        raise ValueError(f"impl must be one of {ALL_IMPLS} or None, got {impl!r}")
    previous, _forced_impl = _forced_impl, impl
    try:
        yield
    finally:
        _forced_impl = previous


def forced_impl() -> str | None:
    """The implementation :func:`scan_impl` or ``$DIT_GSPN_SCAN_IMPL`` forces now, or None."""
    return _forced_impl


def resolve_impl(op: str, tensors, impl: str | None) -> str:
    """The implementation of ``op`` to run on ``tensors`` (its tensor arguments, the first one deciding device,
    dtype and line lengths) when ``impl`` was asked for (None: choose). See the module's docstring."""
    spec = OPS[op]
    if impl is not None and impl not in spec.impls:
        raise ValueError(f"{op}: impl must be one of {spec.impls} or None, got {impl!r}")
    x = tensors[0]
    if impl is None and _forced_impl in spec.impls:
        impl = _forced_impl
    if impl is None:
        device = x.device.type
        if device in COMPILED and kernels_ready(device, spec.compiled_op) and _cuda_problem(op, spec, x) is None:
            return device
        return spec.fallback
    if impl in COMPILED:
        extension.require_kernels(op, impl, x.device, lambda: kernels_ready(impl, spec.compiled_op), spec.fallback)
        problem = _cuda_problem(op, spec, x)
        if problem is not None:
            raise problem
    return impl


def _cuda_problem(op: str, spec: OpSpec, x) -> Exception | None:
    """Why the CUDA kernel of ``op`` cannot run on ``x`` (an error to raise), or None (also for other devices)."""
    if x.device.type != "cuda":
        return None
    lanes = max(x.shape[d] for d in spec.lane_dims)
    if lanes > CUDA_MAX_LANES:
        dims = tuple(x.shape[d] for d in spec.lane_dims)
        return ValueError(f"{op}: the CUDA kernel scans lines of at most {CUDA_MAX_LANES} pixels, got "
                          f"{dims} along dims {spec.lane_dims}; use impl={spec.fallback!r}")
    if spec.cuda_dtypes is not None and x.dtype not in spec.cuda_dtypes:
        return TypeError(f"{op}: the CUDA kernel computes {spec.cuda_dtypes}, got {x.dtype}; use impl={spec.fallback!r}")
    return None


@torch.compiler.assume_constant_result
def kernels_ready(device_type: str, compiled_op: str) -> bool:
    """Whether the compiled kernels for ``device_type`` are loaded (built on first use) and define ``compiled_op``.
    A constant to torch.compile: it builds and loads once, outside the traced graph."""
    return extension.load(device_type) and hasattr(torch.ops.gspn, compiled_op)


_registered: set[str] = set()


def register_op(name: str, fake_fwd, fake_bwd, backward, setup_context) -> None:
    """Register ``gspn::{name}_fwd`` / ``gspn::{name}_bwd``'s fake tensors and the forward's autograd once the
    compiled library is loaded (now, if it is), exactly once per process and only if the library defines them."""

    def register() -> None:
        if name in _registered or not hasattr(torch.ops.gspn, f"{name}_fwd"):
            return
        torch.library.register_fake(f"gspn::{name}_fwd", fake_fwd)
        torch.library.register_fake(f"gspn::{name}_bwd", fake_bwd)
        torch.library.register_autograd(f"gspn::{name}_fwd", backward, setup_context=setup_context)
        _registered.add(name)

    extension.on_load(register)
