"""Timing helpers shared by the benchmarks: one way to time a callable on CPU or GPU and to
measure the memory bandwidth that a memory-bound kernel is judged against.

- :func:`time_callable`: on CUDA, CUDA-event timing of each repeat after warm-up; on CPU, the
  wall clock (``time.perf_counter``) of each repeat after warm-up. Reports the median.
- :func:`copy_bandwidth`: the measured device-to-device copy rate (bytes read + written per
  second) of a large buffer, the practical ceiling of a streaming kernel.
- :func:`device_description`: what the numbers were measured on, for the JSON results.
"""
from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Callable

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_callable(fn: Callable[[], object], device: torch.device | str, warmup: int = 2, repeat: int = 10,
                  max_seconds: float | None = None) -> dict:
    """Run ``fn`` ``warmup`` times, then time ``repeat`` runs; return milliseconds.

    Returns ``{"median_ms", "min_ms", "repeats"}``. On CUDA each run is bracketed by CUDA
    events on the current stream (so launch overhead between runs is not counted); on CPU by
    the wall clock. ``max_seconds`` stops repeating early (after at least one timed run) so a
    slow implementation does not hold a benchmark up.
    """
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    started = time.perf_counter()
    for _ in range(repeat):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        if max_seconds is not None and time.perf_counter() - started > max_seconds:
            break
    return {"median_ms": statistics.median(times), "min_ms": min(times), "repeats": len(times)}


def copy_bandwidth(device: torch.device | str, nbytes: int | None = None, repeat: int = 10) -> float:
    """Measured copy bandwidth in GB/s (10^9 bytes/s), counting the bytes read plus the bytes written.

    The buffer defaults to 1 GiB on CUDA (well past the L2 cache) and 64 MiB on CPU.
    """
    device = torch.device(device)
    if nbytes is None:
        nbytes = (1 << 30) if device.type == "cuda" else (64 << 20)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    timing = time_callable(lambda: dst.copy_(src), device, warmup=2, repeat=repeat)
    return 2 * src.numel() * src.element_size() / (timing["median_ms"] * 1e-3) / 1e9


def gbps(nbytes: int, milliseconds: float) -> float:
    """Bytes moved over time, in GB/s (10^9 bytes/s)."""
    return nbytes / (milliseconds * 1e-3) / 1e9


def device_description(device: torch.device | str) -> dict:
    """The device and software the numbers were measured on."""
    device = torch.device(device)
    info = {"device": str(device), "torch": torch.__version__, "python": platform.python_version()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, sm_count=props.multi_processor_count,
                    memory_gib=round(props.total_memory / 2 ** 30, 1), cuda=torch.version.cuda)
    else:
        info.update(name=_cpu_model(), threads=torch.get_num_threads(), cpus=os.cpu_count())
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
