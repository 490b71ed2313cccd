"""Which implementation runs a scan op: the one place that decides, for every op of ``torch.ops.gspn``.

Each op (``line_scan``, ``gspn_scan``; a new one adds an :class:`OpSpec` to :data:`OPS`) names its
implementations, the fallback that ``impl=None`` takes where its compiled kernel cannot run, the dtypes its
CUDA kernel computes and the dims that are lane axes of its scans. :func:`resolve_impl` ``(op, tensors, impl)``
answers the implementation to run, for every op alike:

- ``impl=None`` takes the implementation forced by :func:`scan_impl` / ``$DIT_GSPN_SCAN_IMPL`` when the op
  offers it; else the compiled kernel of the tensors' device where it built (:mod:`.extension`), can run
  these tensors (CUDA: lines of at most :data:`CUDA_MAX_LANES`, the dtypes it computes) and is trusted on
  this device (:mod:`.selfcheck`: it agreed with the reference there); else the op's fallback. A kernel that
  did not build or that disagreed is named once in a warning by the module that found out.
- An explicit (or forced) ``impl`` runs as asked, the self-check aside; an unknown name, tensors on another
  device, a kernel that did not build, or tensors the CUDA kernel cannot run are errors naming the way out.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch

from . import extension, selfcheck

#: The longest line (lanes along a scanned row) any CUDA kernel scans: line_scan's kMaxW (512 threads x 4
#: columns) and the shared memory gspn_scan stages one lane vector per tensor in. The kernels refuse longer
#: lines themselves (they would overrun shared memory); this gives ``impl=None`` its fallback instead.
CUDA_MAX_LANES = 2048
#: Environment variable read once at import: the implementation used where ``impl=None``.
IMPL_ENV = "DIT_GSPN_SCAN_IMPL"
COMPILED = ("cpu", "cuda")


@dataclass(frozen=True)
class OpSpec:
    """What the dispatch needs to know of one op."""

    impls: tuple[str, ...]  # every name ``impl=`` accepts
    fallback: str  # what ``impl=None`` runs where the compiled kernel cannot
    lane_dims: tuple[int, ...]  # dims of the first tensor that are lane axes of some scan
    cuda_dtypes: tuple[torch.dtype, ...] | None = None  # None: every floating dtype


OPS: dict[str, OpSpec] = {
    "line_scan": OpSpec(("reference", "cpu", "cuda"), "reference", (-1,)),
    "gspn_scan": OpSpec(("reference", "composed", "cpu", "cuda"), "composed", (-2, -1),
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
        device = x.device
        if device.type in COMPILED and _cuda_problem(op, spec, x) is None and kernel_usable(op, str(device)):
            return device.type
        return spec.fallback
    if impl in COMPILED:
        if x.device.type != impl:
            raise ValueError(f"{op}: impl={impl!r} needs {impl} tensors, got tensors on {x.device}")
        if not kernels_loaded(impl):
            raise RuntimeError(
                f"{op}: impl={impl!r} was asked for but the compiled {impl} kernels did not build or load (see the "
                f"warning above, or run `python -m dit_gspn.ops.build{' --cuda' if impl == 'cuda' else ''}`); use "
                f"impl=None or {spec.fallback!r}")
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
def kernels_loaded(device_type: str) -> bool:
    """Whether the compiled kernels for ``device_type`` are loaded (built on first use). A constant to
    torch.compile: it builds and loads once, outside the traced graph."""
    return extension.load(device_type)


@torch.compiler.assume_constant_result
def kernel_usable(op: str, device: str) -> bool:
    """Whether ``impl=None`` may run ``op``'s compiled kernel on ``device`` ("cpu", "cuda:0"): it is loaded and
    passed its self-check there. A constant to torch.compile, decided once, outside the traced graph."""
    return extension.load(torch.device(device).type) and selfcheck.trusted(op, device)
