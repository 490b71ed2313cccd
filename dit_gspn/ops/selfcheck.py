"""A compiled kernel is trusted on a device only once it agreed there with the PyTorch reference.

The first time a process would run an op's compiled kernel on a device (:func:`trusted`, asked by the
dispatch for ``impl=None``), it runs the kernel and the float64 reference on a few small random inputs,
forward and every gradient (a fraction of a second), and records the verdict in ``self_check.json`` beside
the build, under the device's description (:func:`describe`: the CPU model; the GPU's name and compute
capability; the build itself is the folder, named by its source hash). Later processes read the verdict
instead of checking again. A kernel that disagrees (a NaN or infinite error included), or raises, is not
used: the op's fallback runs instead, after one warning naming the op, the device and the error. Delete the
file to check again.
"""
from __future__ import annotations

import functools
import json
import math
import platform
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from filelock import FileLock

from ..atomic_write import write_text_atomically
from . import extension
from .reference import gspn_scan_reference, line_scan_reference, normalize_gates

#: The verdicts' file, in the build's folder.
VERDICTS = "self_check.json"
#: The largest error allowed, relative to the reference's scale (max |reference|, at least 1), per dtype.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


def describe(device: torch.device) -> str:
    """The hardware a kernel runs on: the CPU model, or the GPU's name and compute capability."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} (sm_{major}{minor})"
    return f"{_cpu_model()} (cpu)"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def verdict_file() -> Path:
    """Where the verdicts of the loaded build live."""
    return extension.loaded_build().folder / VERDICTS


@functools.cache
def trusted(op: str, device: str) -> bool:
    """Whether ``op``'s compiled kernel (loaded) may run on ``device``: its recorded verdict for this device, or
    the verdict of a check run now and recorded. Answered once per process; a distrusted kernel warns once."""
    where = torch.device(device)
    hardware = describe(where)
    path = verdict_file()
    verdict, where_recorded = None, f"verdict recorded in {path}; delete it to check again"
    try:
        with FileLock(str(path) + ".lock"):
            verdicts = _read(path)
            verdict = verdicts.get(hardware, {}).get(op)
            if verdict is None:
                verdict = check(op, where)
                verdicts.setdefault(hardware, {})[op] = verdict
                write_text_atomically(path, json.dumps(verdicts, indent=1, sort_keys=True) + "\n")
    except OSError:  # a build folder this process may not write: the verdict holds for this process only
        verdict, where_recorded = verdict or check(op, where), f"could not record the verdict in {path}"
    if not verdict["agrees"]:
        from .dispatch import OPS  # the dispatch imports this module

        warnings.warn(f"dit_gspn: the compiled {op} kernel disagrees with the reference on {hardware}: "
                      f"{verdict['error']}; running impl={OPS[op].fallback!r} instead ({where_recorded})",
                      RuntimeWarning, stacklevel=2)
    return verdict["agrees"]


def _read(path: Path) -> dict:
    """The recorded verdicts, {hardware: {op: verdict}}; none for a missing or unreadable file (checked again)."""
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return {}


def check(op: str, device: torch.device) -> dict:
    """Compare ``op``'s compiled kernel on ``device`` with the float64 reference on the CPU, on every case of
    :data:`CASES`: a verdict ``{"agrees", "error", "checked_at", "torch"}``, ``error`` naming the largest
    disagreement (relative to its tolerance) or what the kernel raised.

    Inputs come from a private generator (the caller's random stream is untouched); autocast, no_grad and
    inference mode are set aside for the check."""
    generator = torch.Generator().manual_seed(0)
    worst, error = 0.0, "none"
    try:
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
            for case in CASES[op]:
                inputs, grad_out = case.inputs(generator)
                tol = TOLERANCE[case.dtype]
                got = _output_and_grads(case.kernel, [t.to(device, case.dtype) for t in inputs],
                                        grad_out.to(device, case.dtype))
                expected = _output_and_grads(case.reference, [t.to(case.dtype).double() for t in inputs],
                                             grad_out.to(case.dtype).double())
                for what, a, b in zip(("output", *(f"d{name}" for name in case.names)), got, expected):
                    scale = max(b.abs().max().item(), 1.0) if b.numel() else 1.0
                    err = (a.detach().cpu().double() - b).abs().max().item() / scale if b.numel() else 0.0
                    ratio = err / tol if math.isfinite(err) else math.inf  # a NaN or inf is the worst error
                    if ratio > worst:
                        worst = ratio
                        error = f"max error {err:.3g} (tolerance {tol:g}, relative to scale) in {what} of {case.name}"
    except Exception as exc:  # noqa: BLE001 -- a kernel that raises disagrees; say what it raised
        lines = str(exc).strip().splitlines()
        worst, error = float("inf"), f"{type(exc).__name__}: {lines[0] if lines else ''}"
    return {"agrees": worst <= 1.0, "error": error, "checked_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "torch": torch.__version__}


def _output_and_grads(fn, inputs, grad_out):
    """fn's output and the gradients of <output, grad_out> for every input (zeros for inputs it does not read)."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, grad_out, allow_unused=True)
    return [out, *(torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads))]


@dataclass(frozen=True)
class Case:
    """One comparison: the inputs ``make`` draws (named ``names``), cast to ``dtype``, through the kernel's call
    and the reference's."""

    name: str
    dtype: torch.dtype
    names: tuple[str, ...]  # the inputs, in call order
    make: Callable  # (generator) -> float64 CPU inputs
    kernel: Callable
    reference: Callable

    def inputs(self, generator):
        inputs = self.make(generator)
        return inputs, torch.randn(inputs[0].shape, generator=generator, dtype=torch.float64)


def _line_scan_inputs(shape):
    def make(gen):
        x = torch.randn(shape, generator=gen, dtype=torch.float64)
        lam = torch.rand(shape, generator=gen, dtype=torch.float64) * 0.8 + 0.2
        return [x, lam, *normalize_gates(*(torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(3)))]
    return make


def _gspn_scan_inputs(B, C, H, W, groups, channels_last=False):
    def make(gen):
        x = torch.randn(B, C, H, W, generator=gen, dtype=torch.float64)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        lam, gl, gc, gr, u = (torch.randn(B, 4, g, H, W, generator=gen, dtype=torch.float64) for g in groups)
        return [x, lam.sigmoid(), gl * 1.5, gc * 1.5, gr * 1.5, u]
    return make


def _line_scan_case(shape, dtype, chunk):
    return Case(f"line_scan{tuple(shape)} chunk={chunk}", dtype, ("x", "lam", "wl", "wc", "wr"), _line_scan_inputs(shape),
                lambda *a: torch.ops.gspn.line_scan_fwd(*a, chunk or 0), lambda *a: line_scan_reference(*a, chunk))


def _gspn_scan_case(shape, groups, dtype, chunk, channels_last=False):
    layout = " channels-last" if channels_last else ""
    return Case(f"gspn_scan{shape} groups={groups} chunk={chunk}{layout}", dtype, ("x", "lam", "gl", "gc", "gr", "u"),
                _gspn_scan_inputs(*shape, groups, channels_last),
                lambda *a: torch.ops.gspn.gspn_scan_fwd(*a, chunk or 0), lambda *a: gspn_scan_reference(*a, chunk))


#: What each op's kernel is compared on: both dtypes the models train in, restarts and whole scans, grouped and
#: per-channel gates, lines shorter and longer than a warp (the CUDA kernels pick their blocks by line length),
#: and the CPU's channels-last kernel (a map of tokens, five tensors sharing groups of 8 channels).
CASES = {
    "line_scan": [
        _line_scan_case((2, 3, 6, 5), torch.float32, 4),
        _line_scan_case((1, 2, 5, 40), torch.bfloat16, None),
    ],
    "gspn_scan": [
        _gspn_scan_case((2, 4, 5, 7), (4, 2, 1, 4, 2), torch.float32, 3),
        _gspn_scan_case((1, 16, 6, 5), (2, 2, 2, 2, 2), torch.float32, None, channels_last=True),
        _gspn_scan_case((1, 4, 5, 40), (4, 4, 4, 4, 4), torch.bfloat16, None),
    ],
}
