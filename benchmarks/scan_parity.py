"""Kernel-vs-reference parity summary: the compiled ``line_scan`` and ``gspn_scan`` of a device against
the float64 PyTorch reference, forward and backward, per dtype and shape, as scaled max errors (max
|kernel - reference| / max(max |reference|, 1)) with the tolerance each must meet, and whether two
backward runs with grouped gates are bitwise equal. Writes JSON; exits 1 if any row fails.

    python -m benchmarks.scan_parity --device cuda --out parity.json
    python -m benchmarks.scan_parity --device cuda --tiny --out parity.json   # one small shape per op
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from benchmarks.timing import device_description
from dit_gspn.ops import gspn_scan, line_scan, normalize_gates
from dit_gspn.ops.reference import gspn_scan_reference, line_scan_reference

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}
LINE_SCAN_SHAPES = [((4, 16, 16, 16), None), ((2, 8, 64, 200), 7), ((1, 2, 12, 2048), None)]
GSPN_SCAN_SHAPES = [((2, 16, 16, 16), (16, 4, 4, 4, 16), 8), ((1, 8, 64, 48), (8, 8, 8, 8, 8), None),
                    ((1, 2, 24, 300), (1, 2, 1, 2, 1), 5)]
TINY = {"line_scan": [((2, 3, 5, 7), 2)], "gspn_scan": [((1, 2, 5, 6), (2, 1, 2, 1, 2), None)]}


def scaled_error(actual, expected) -> float:
    diff = (actual.double() - expected.double()).abs()
    if not torch.isfinite(diff).all():
        return float("inf")
    return diff.max().item() / max(expected.double().abs().max().item(), 1.0)


def grads_of(fn, leaves, grad_out):
    out = fn(*leaves)
    return [out] + list(torch.autograd.grad(out, leaves, grad_out.to(out.dtype), allow_unused=True))


def line_scan_inputs(shape, dtype, device):
    x, lam = torch.randn(shape, device=device), torch.rand(shape, device=device) * 2 - 1
    weights = normalize_gates(*(torch.randn(shape, device=device) for _ in range(3)))
    return [t.to(dtype) for t in (x, lam, *weights)]


def gspn_scan_inputs(shape, groups, dtype, device):
    B, C, H, W = shape
    x = torch.randn(shape, device=device)
    gates = [torch.randn(B, 4, g, H, W, device=device) * 1.5 for g in groups]
    gates[0] = gates[0].sigmoid()  # lam
    return [t.to(dtype) for t in (x, *gates)]


def compare(op, inputs, impl, chunk, grad_out):
    kernel = (lambda *t: line_scan(*t, chunk=chunk, impl=impl)) if op == "line_scan" else \
        (lambda *t: gspn_scan(*t, chunk=chunk, impl=impl))
    oracle = (lambda *t: line_scan_reference(*t, chunk=chunk)) if op == "line_scan" else \
        (lambda *t: gspn_scan_reference(*t, chunk=chunk))
    got = grads_of(kernel, [t.detach().clone().requires_grad_() for t in inputs], grad_out)
    ref = grads_of(oracle, [t.detach().double().requires_grad_() for t in inputs], grad_out.double())
    errors = [scaled_error(g, r) for g, r in zip(got, ref) if r is not None]
    again = grads_of(kernel, [t.detach().clone().requires_grad_() for t in inputs], grad_out)
    deterministic = all(torch.equal(a, b) for a, b in zip(got[1:], again[1:]))
    return {"forward": errors[0], "backward": max(errors[1:]), "backward_bitwise_repeatable": deterministic}


def run(device, dtypes, tiny):
    rows = []
    impl = device.type
    for op in ("line_scan", "gspn_scan"):
        cases = TINY[op] if tiny else (LINE_SCAN_SHAPES if op == "line_scan" else GSPN_SCAN_SHAPES)
        for dtype in dtypes:
            for case in cases:
                torch.manual_seed(0)
                if op == "line_scan":
                    shape, chunk = case
                    groups = None
                    inputs = line_scan_inputs(shape, dtype, device)
                else:
                    shape, groups, chunk = case
                    inputs = gspn_scan_inputs(shape, groups, dtype, device)
                grad_out = torch.randn(shape, device=device)
                row = {"op": op, "impl": impl, "dtype": str(dtype).replace("torch.", ""), "shape": list(shape),
                       "groups": groups, "chunk": chunk, "tolerance": TOLERANCE[dtype]}
                try:
                    row.update(compare(op, inputs, impl, chunk, grad_out))
                    row["passed"] = (max(row["forward"], row["backward"]) <= TOLERANCE[dtype]
                                     and row["backward_bitwise_repeatable"])
                except Exception as exc:  # noqa: BLE001 -- one failing case is a row, not the end of the summary
                    row.update(error=f"{type(exc).__name__}: {exc}", passed=False)
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", type=Path, required=True, help="write the summary here (JSON)")
    parser.add_argument("--tiny", action="store_true", help="one small float32 shape per op (for sanitizers)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is visible")
    dtypes = [torch.float32] if args.tiny else [torch.float32, torch.bfloat16, torch.float16]
    rows = run(device, dtypes, args.tiny)
    failed = [r for r in rows if not r["passed"]]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"device": device_description(device), "rows": rows,
                                    "failed": len(failed)}, indent=1) + "\n")
    print(f"{len(rows) - len(failed)} of {len(rows)} parity rows pass; wrote {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
