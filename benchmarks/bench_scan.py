"""Scan benchmark: forward and forward+backward time of every implementation of ``line_scan``
(and of the fused ``gspn_scan`` where it offers its implementations), side by side, as
milliseconds, GB/s of the bytes the op must move, and the fraction of the measured copy
bandwidth. Writes JSON with ``--out``.

    python -m benchmarks.bench_scan                      # GPU if there is one, else CPU shapes
    python -m benchmarks.bench_scan --device cpu --out benchmarks/results/bench_scan_cpu.json
    python -m benchmarks.bench_scan --smoke              # seconds: tiny shapes (for tests)

Bytes counted per element of the (..., H, W) map: line_scan forward reads 5 maps and writes 1;
its backward reads 7 (grad_h, h and the 5 inputs) and writes 5: what its kernels move. gspn_scan
(per-channel gates) forward must read x and 4 directions x 5 gate maps and write y; its backward
must read grad_y, x and the 20 gate maps and write their 21 gradients: the minimum ("bytes",
"gbps", "fraction_of_copy_bandwidth"). Its CUDA kernels move more (x once per direction, the fp32
direction sums, the backward's checkpoint sweep: benchmarks/scan_model.py::moved_bytes); for the
cuda implementation "kernel_bytes", "kernel_gbps" and "kernel_fraction_of_copy_bandwidth" count those.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
import warnings
from pathlib import Path

import torch

from benchmarks.timing import copy_bandwidth, device_description, gbps, time_callable
from dit_gspn.ops import extension, line_scan, normalize_gates

GPU_SHAPES = [(32, 4608, 16, 16), (8, 512, 128, 128), (1, 64, 1024, 1024)]  # DiT-XL/2 tokens x 4C; high-res
CPU_SHAPES = [(8, 64, 64, 64), (32, 256, 16, 16)]
SMOKE_SHAPES = [(2, 8, 16, 16), (1, 4, 12, 20)]

LINE_SCAN_BYTES = {"forward": 6, "backward": 12, "forward_backward": 18}
GSPN_SCAN_BYTES = {"forward": 22, "backward": 43, "forward_backward": 65}


def line_scan_inputs(shape, dtype, device):
    x = torch.randn(shape, device=device, dtype=dtype)
    lam = (torch.rand(shape, device=device, dtype=dtype) * 2 - 1)
    wl, wc, wr = normalize_gates(*(torch.randn(shape, device=device, dtype=dtype) for _ in range(3)))
    return [x, lam, wl, wc, wr]


def gspn_scan_inputs(shape, dtype, device):
    B, C, H, W = shape
    x = torch.randn(shape, device=device, dtype=dtype)
    gates = [torch.randn(B, 4, C, H, W, device=device, dtype=dtype) for _ in range(5)]
    gates[0] = gates[0].sigmoid()  # lam
    return [x, *gates]


def time_op(op, inputs, device, repeat, max_seconds, bytes_per_element, kernel_bytes=None):
    """Forward, backward and forward+backward timings of ``op(*inputs)`` with rates; ``kernel_bytes``
    ({phase: bytes}), when given, adds the rate of the bytes the kernel really moves."""
    warmup = 2 if device.type == "cuda" else 1  # CPU runs need no clocks or caches warmed
    n = inputs[0].numel() * inputs[0].element_size()
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    with torch.no_grad():
        out = op(*inputs)
    grad = torch.randn_like(out)
    del out
    timings = {}
    with torch.no_grad():
        timings["forward"] = time_callable(lambda: op(*inputs), device, warmup, repeat, max_seconds)
    timings["forward_backward"] = time_callable(
        lambda: torch.autograd.grad(op(*leaves), leaves, grad, allow_unused=True), device, warmup, repeat, max_seconds)
    out = op(*leaves)
    timings["backward"] = time_callable(
        lambda: torch.autograd.grad(out, leaves, grad, retain_graph=True, allow_unused=True),
        device, warmup, repeat, max_seconds)
    for phase, t in timings.items():
        moved = bytes_per_element[phase] * n
        t["bytes"] = moved
        t["gbps"] = gbps(moved, t["median_ms"])
        if kernel_bytes is not None:
            t["kernel_bytes"] = kernel_bytes[phase]
            t["kernel_gbps"] = gbps(kernel_bytes[phase], t["median_ms"])
    return timings


def gspn_scan_kernel_bytes(shape, dtype) -> dict:
    """{phase: HBM bytes} the fused CUDA kernels move at ``shape`` (the performance model's account)."""
    from benchmarks.scan_model import kernel_bytes

    size = torch.empty((), dtype=dtype).element_size()
    fwd, bwd = (kernel_bytes(phase, shape, size) for phase in ("forward", "backward"))
    return {"forward": fwd, "backward": bwd, "forward_backward": fwd + bwd}


def line_scan_impls(device):
    impls = ["reference"]
    if extension.load(device.type):
        impls.insert(0, device.type)
    return impls


def gspn_scan_impls(device):
    """The fused op's implementations on ``device``, or [] while it does not offer them."""
    try:
        module = importlib.import_module("dit_gspn.ops.gspn_scan")
    except Exception:  # noqa: BLE001 -- a missing or broken fused op must not stop the line_scan benchmark
        return None, []
    impls = getattr(module, "IMPLS", ())
    usable = [i for i in impls if i in ("reference", "composed") or i == device.type]
    if device.type in usable and not extension.load(device.type):
        usable.remove(device.type)
    return getattr(module, "gspn_scan", None), usable


def with_fractions(timings, copy_gbps):
    for t in timings.values():
        t["fraction_of_copy_bandwidth"] = t["gbps"] / copy_gbps
        if "kernel_gbps" in t:
            t["kernel_fraction_of_copy_bandwidth"] = t["kernel_gbps"] / copy_gbps
    return timings


def run(device, shapes, dtype, repeat, max_seconds, include_gspn=True):
    copy_gbps = copy_bandwidth(device)
    results = {"device": device_description(device), "dtype": str(dtype).replace("torch.", ""),
               "copy_bandwidth_gbps": copy_gbps, "line_scan": [], "gspn_scan": [], "speedups": []}
    print(f"{results['device']['name']} ({device}), {results['dtype']}, copy bandwidth {copy_gbps:.1f} GB/s", flush=True)
    for shape in shapes:
        inputs = line_scan_inputs(shape, dtype, device)
        per_impl = {}
        for impl in line_scan_impls(device):
            op = lambda *t, impl=impl: line_scan(*t, impl=impl)  # noqa: E731
            timings = with_fractions(time_op(op, inputs, device, repeat, max_seconds, LINE_SCAN_BYTES), copy_gbps)
            per_impl[impl] = timings
            results["line_scan"].append({"shape": list(shape), "impl": impl, **timings})
            print(_row("line_scan", shape, impl, timings), flush=True)
        if device.type in per_impl:
            speedup = {phase: per_impl["reference"][phase]["median_ms"] / per_impl[device.type][phase]["median_ms"]
                       for phase in LINE_SCAN_BYTES}
            results["speedups"].append({"op": "line_scan", "shape": list(shape), "impl": device.type,
                                        "over": "reference", **speedup})
            print(f"  line_scan {device.type} kernel vs reference: forward {speedup['forward']:.1f}x, "
                  f"forward+backward {speedup['forward_backward']:.1f}x", flush=True)
        del inputs
        if include_gspn:
            _run_gspn_scan(device, shape, dtype, repeat, max_seconds, copy_gbps, results)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def _run_gspn_scan(device, shape, dtype, repeat, max_seconds, copy_gbps, results):
    gspn_scan, impls = gspn_scan_impls(device)
    if gspn_scan is None or not impls:
        return
    inputs = gspn_scan_inputs(shape, dtype, device)
    for impl in impls:
        op = lambda *t, impl=impl: gspn_scan(*t, impl=impl)  # noqa: E731
        moved = gspn_scan_kernel_bytes(shape, dtype) if impl == "cuda" else None
        try:
            timings = with_fractions(time_op(op, inputs, device, repeat, max_seconds, GSPN_SCAN_BYTES, moved),
                                     copy_gbps)
        except Exception as exc:  # noqa: BLE001 -- record and go on: one broken implementation must not hide the rest
            results["gspn_scan"].append({"shape": list(shape), "impl": impl, "error": f"{type(exc).__name__}: {exc}"})
            print(f"gspn_scan {tuple(shape)} {impl}: failed: {exc}", flush=True)
            continue
        results["gspn_scan"].append({"shape": list(shape), "impl": impl, **timings})
        print(_row("gspn_scan", shape, impl, timings), flush=True)


def _row(op, shape, impl, timings):
    cells = "  ".join(
        f"{phase} {t['median_ms']:9.3f} ms {t['gbps']:8.1f} GB/s ({100 * t['fraction_of_copy_bandwidth']:5.1f}%"
        + (f", kernel's bytes {100 * t['kernel_fraction_of_copy_bandwidth']:5.1f}%" if "kernel_gbps" in t else "") + ")"
        for phase, t in timings.items())
    return f"{op:9s} {str(tuple(shape)):22s} {impl:9s} {cells}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="default: bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--shapes", default=None,
                        help="semicolon-separated B,C,H,W shapes, e.g. '8,64,64,64;2,16,32,48'")
    parser.add_argument("--repeat", type=int, default=None, help="timed runs per measurement")
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="stop repeating a measurement after this long (default 20 s on CPU)")
    parser.add_argument("--no-gspn-scan", action="store_true", help="time line_scan only")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, few repeats: a seconds-long check")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes.split(";")]
    else:
        shapes = SMOKE_SHAPES if args.smoke else (GPU_SHAPES if device.type == "cuda" else CPU_SHAPES)
    repeat = args.repeat or (2 if args.smoke else (20 if device.type == "cuda" else 5))
    max_seconds = args.max_seconds if args.max_seconds is not None else (1.0 if args.smoke else (None if device.type == "cuda" else 20.0))
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        results = run(device, shapes, dtype, repeat, max_seconds, include_gspn=not args.no_gspn_scan)
    results["command"] = " ".join(["python", "-m", "benchmarks.bench_scan", *(argv if argv is not None else sys.argv[1:])])
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
