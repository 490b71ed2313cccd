"""Runs the CUDA kernels' threads on the CPU (one fiber per thread, ``fibers.h``) for every case and
thread order, against the float64 PyTorch reference, and writes what it found as JSON.

    python tests/kernels/cuda_emulation/driver.py --out fibers.json [--planted] [--out-of-bounds]

Under AddressSanitizer (what tests/kernels/test_cuda_threads_on_cpu.py does) every tensor the kernels
touch is a heap block with redzones, so an out-of-bounds global access aborts with ASan's report:

    LD_PRELOAD=$(gcc -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0 python tests/kernels/cuda_emulation/driver.py ...

The library is then built with -fsanitize=address (the compiler runs without the preload).
``--planted`` deletes each barrier of each kernel in turn and counts the cases that notice;
``--out-of-bounds`` runs one scan with an output one element short (ASan must abort).
"""
from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks.scan_parity import scaled_error  # noqa: E402
from dit_gspn.ops import extension  # noqa: E402
from dit_gspn.ops.reference import gspn_scan_reference, line_scan_reference, normalize_gates  # noqa: E402

ORDERS = ("forward", "reverse", "shuffled", "alternating")
#: The orders a deleted barrier is looked for in (the forward order often hides one).
PLANTED_ORDERS = ("reverse", "shuffled")
TOLERANCE = 2e-5  # float32 kernels against the float64 reference, relative to max(|reference|, 1)

#: (name, shape (..., H, W), chunk): block shapes from launch_shape, packed planes to the widest row.
LINE_SCAN_CASES = [
    ("dit-grid-packed", (2, 3, 16, 16), None),  # 16 planes of 16 threads per block
    ("packed-ragged", (5, 9, 13), 4),  # 19 planes per block, 14 of them dead
    ("one-plane-300", (2, 7, 300), None),
    ("full-block-1024", (1, 5, 1024), 2),
    ("wide-4-cols", (1, 4, 1500), None),  # 375 threads x 4 columns
    ("H1", (3, 1, 9), None),
    ("W1", (2, 6, 1), 2),
    ("widest-2048", (1, 7, 2048), 3),  # 512 threads x 4 columns
]

#: (name, (B, C, H, W), groups (lam, gl, gc, gr, u) or None for C, chunk, tile or 0 for pick_tile's[,
#: directions per block: 4 unless given, 2 or 1 split a plane's directions over blocks (direction_split)]).
#: "extreme-logits" draws the gate logits around -1e4 and +1e4 (the stable normalisation's case).
GSPN_SCAN_CASES = [
    ("odd", (2, 3, 5, 7), None, None, 0),
    ("odd-split-1", (2, 3, 5, 7), None, None, 0, 1),  # a block per (plane, direction)
    ("mixed-groups-tile3", (1, 4, 7, 4), (2, 4, 1, 2, 4), 2, 3),
    ("H1", (1, 2, 1, 6), None, None, 0),
    ("W1-G1-tile4", (1, 2, 6, 1), (1, 1, 1, 1, 1), 3, 4),
    ("square-chunked-tile2", (2, 6, 9, 9), (2, 3, 6, 1, 3), 4, 2),
    ("square-chunked-split-2", (2, 6, 9, 9), (2, 3, 6, 1, 3), 4, 2, 2),
    ("chunk1", (1, 4, 3, 11), (4, 4, 4, 4, 4), 1, 4),
    ("chunk5-tile16", (1, 2, 12, 10), (1, 2, 1, 2, 1), 5, 16),
    ("more-lanes-than-threads", (1, 1, 3, 257), None, 2, 4),  # 256 threads, 257 lanes
    ("extreme-logits", (1, 2, 5, 6), (2, 1, 2, 1, 2), None, 0),
    ("global-checkpoints-tile4", (1, 2, 13, 6), None, None, 4),  # a global scan over 4 tiles of checkpoints
    ("grouped-global-tile2", (2, 4, 6, 9), (1, 2, 4, 2, 1), None, 2),
    ("grouped-global-split-1", (1, 4, 6, 9), (1, 2, 4, 2, 1), None, 2, 1),
]


def under_asan() -> bool:
    with open("/proc/self/maps") as maps:
        return "libasan" in maps.read()


def build():
    """The emulation library, loaded with ctypes; built with g++ (-fsanitize=address when ASan is loaded
    in this process) into the extension cache when its sources or flags changed."""
    asan = under_asan()
    os.environ.pop("LD_PRELOAD", None)  # the compiler runs without the sanitizer
    flags = ["-O1", "-std=c++17", "-shared", "-fPIC", f"-I{extension.CSRC}", f"-I{HERE}"]
    if asan:
        flags += ["-fsanitize=address", "-fno-omit-frame-pointer"]
    headers = [p for p in sorted(extension.CSRC.rglob("*")) if p.suffix in extension.HEADER_SUFFIXES]
    sources = [HERE / "emulate.cpp", HERE / "fibers.h", *headers]
    digest = hashlib.sha256(" ".join(flags).encode() + b"".join(p.read_bytes() for p in sources)).hexdigest()[:16]
    library = extension.cache_dir() / "cuda_fibers" / f"emulate-{'asan-' if asan else ''}{digest}.so"
    if not library.exists():
        library.parent.mkdir(parents=True, exist_ok=True)
        partial = library.with_suffix(f".{os.getpid()}.tmp")
        subprocess.run([os.environ.get("CXX", "g++"), *flags, str(HERE / "emulate.cpp"), "-o", str(partial)],
                       check=True)
        partial.replace(library)
    lib = ctypes.CDLL(str(library))
    lib.last_error.restype = ctypes.c_char_p
    return lib


def _pointers(*tensors):
    return [ctypes.c_void_p(t.data_ptr()) for t in tensors]


def _check(lib, status):
    if status != 0:
        raise RuntimeError(lib.last_error().decode())


def emulated_line_scan(lib, inputs, grad, chunk, order, seed, drop_kernel=0, drop_site=-1, h_short=False):
    """(h, dx, dlam, dwl, dwc, dwr), barrier counts: the CUDA kernels on NaN-poisoned float32 outputs."""
    x = inputs[0]
    H, W = x.shape[-2:]
    h = torch.full((x.numel() - 1,) if h_short else x.shape, float("nan"))
    grads = [torch.full(x.shape, float("nan")) for _ in range(5)]
    sites = torch.zeros(2, dtype=torch.int64)
    _check(lib, lib.line_scan(*_pointers(*inputs, grad, h, *grads), ctypes.c_int64(x.numel() // (H * W)),
                              ctypes.c_int64(H), ctypes.c_int64(W), ctypes.c_int64(chunk or 0), ORDERS.index(order),
                              ctypes.c_uint64(seed), drop_kernel, drop_site, ctypes.c_void_p(sites.data_ptr())))
    return [h, *grads], sites.tolist()


def emulated_gspn_scan(lib, inputs, grad, chunk, tile, per_block, order, seed, drop_kernel=0, drop_site=-1):
    """(y, dx, dlam, dgl, dgc, dgr, du), barrier counts; the group sums are taken as the CUDA host code does."""
    x, gates = inputs[0], inputs[1:]
    B, C, H, W = x.shape
    shape = torch.tensor([B, C, H, W, *(t.shape[2] for t in gates)], dtype=torch.int64)
    y, dx = (torch.full(x.shape, float("nan")) for _ in range(2))
    per_channel = [torch.full((B, 4, C, H, W), float("nan")) for _ in gates]
    sites = torch.zeros(2, dtype=torch.int64)
    _check(lib, lib.gspn_scan(*_pointers(*inputs, grad, y, dx, *per_channel, shape), ctypes.c_int64(chunk or 0),
                              tile, per_block, ORDERS.index(order), ctypes.c_uint64(seed), drop_kernel, drop_site,
                              ctypes.c_void_p(sites.data_ptr())))
    sums = [d.view(B, 4, t.shape[2], C // t.shape[2], H, W).sum(3) for d, t in zip(per_channel, gates)]
    return [y, dx, *sums], sites.tolist()


def line_scan_inputs(shape, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    lam = torch.rand(shape, generator=g) * 2 - 1
    wl, wc, wr = normalize_gates(*(torch.randn(shape, generator=g) for _ in range(3)))
    gh = torch.randn(shape, generator=g)
    return [x, lam, wl, wc, wr], gh


def gspn_scan_inputs(shape, groups, seed, extreme=False):
    B, C, H, W = shape
    g = torch.Generator().manual_seed(seed)
    groups = groups or (C,) * 5
    x = torch.randn(B, C, H, W, generator=g)
    lam = torch.rand(B, 4, groups[0], H, W, generator=g) * 0.8 + 0.2
    logits = [torch.randn(B, 4, k, H, W, generator=g) * 1.5 for k in groups[1:4]]
    if extreme:
        logits = [(torch.randint(0, 2, t.shape, generator=g) * 2 - 1) * 1e4 + 3 * t for t in logits]
    u = torch.randn(B, 4, groups[4], H, W, generator=g)
    gy = torch.randn(B, C, H, W, generator=g)
    return [x, lam, *logits, u], gy


def reference(op, inputs, grad_out, chunk):
    leaves = [t.double().requires_grad_() for t in inputs]
    out = op(*leaves, chunk=chunk)
    grads = torch.autograd.grad(out, leaves, grad_out.double(), allow_unused=True)
    return [out.detach()] + [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads)]


class Case:
    """One kernel configuration: its inputs, its float64 reference, and a call of the emulated kernels."""

    def __init__(self, module, op, name, seed):
        self.op, self.name = op, name
        spec = dict((c[0], c) for c in (LINE_SCAN_CASES if op == "line_scan" else GSPN_SCAN_CASES))[name]
        if op == "line_scan":
            _, shape, self.chunk = spec
            self.inputs, self.grad = line_scan_inputs(shape, seed)
            self.expected = reference(line_scan_reference, self.inputs, self.grad, self.chunk)
            self.call = lambda order, drop_kernel=0, drop_site=-1: emulated_line_scan(
                module, self.inputs, self.grad, self.chunk, order, seed, drop_kernel, drop_site)
        else:
            _, shape, groups, self.chunk, tile, *split = spec
            per_block = split[0] if split else 4
            self.inputs, self.grad = gspn_scan_inputs(shape, groups, seed, extreme=name == "extreme-logits")
            self.expected = reference(gspn_scan_reference, self.inputs, self.grad, self.chunk)
            self.call = lambda order, drop_kernel=0, drop_site=-1: emulated_gspn_scan(
                module, self.inputs, self.grad, self.chunk, tile, per_block, order, seed, drop_kernel, drop_site)

    def run(self, order, drop_kernel=0, drop_site=-1):
        """(outputs, barrier counts (forward, backward), error or None) of one emulated run."""
        try:
            outputs, sites = self.call(order, drop_kernel, drop_site)
        except RuntimeError as exc:
            return None, None, str(exc)
        return outputs, sites, None

    def max_error(self, outputs) -> float:
        return max(scaled_error(a, e) for a, e in zip(outputs, self.expected))


def run_all(module, planted: bool) -> dict:
    results = {"asan": under_asan(), "tolerance": TOLERANCE, "runs": [], "planted": []}
    cases = [Case(module, "line_scan", c[0], i) for i, c in enumerate(LINE_SCAN_CASES)]
    cases += [Case(module, "gspn_scan", c[0], 100 + i) for i, c in enumerate(GSPN_SCAN_CASES)]
    sites = {}
    for case in cases:
        first = None
        for order in ORDERS:
            outputs, counts, error = case.run(order)
            record = {"op": case.op, "case": case.name, "order": order, "error": error}
            if outputs is not None:
                first = first or outputs
                sites[case.op] = [max(a, b) for a, b in zip(sites.get(case.op, [0, 0]), counts)]
                record["max_error"] = case.max_error(outputs)
                record["bitwise_equal_to_forward"] = all(torch.equal(a, b) for a, b in zip(outputs, first))
            results["runs"].append(record)
    results["barrier_sites"] = sites
    if planted:
        for op in ("line_scan", "gspn_scan"):
            for kernel, phase in ((1, "fwd"), (2, "bwd")):
                for site in range(sites[op][kernel - 1]):
                    detected = []
                    op_cases = [c for c in cases if c.op == op]
                    for case in op_cases:
                        for order in PLANTED_ORDERS:
                            outputs, _, error = case.run(order, kernel, site)
                            if error is not None or not case.max_error(outputs) <= TOLERANCE:
                                detected.append(case.name)
                                break
                    results["planted"].append({"kernel": f"{op}_{phase}", "site": site, "configs": len(op_cases),
                                               "detected": len(detected), "detected_in": detected})
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="write the results here (JSON)")
    parser.add_argument("--planted", action="store_true", help="also delete each barrier in turn")
    parser.add_argument("--out-of-bounds", action="store_true", help="run one scan that writes past its output")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    started = time.perf_counter()
    module = build()
    built = time.perf_counter()
    if args.out_of_bounds:
        inputs, grad = line_scan_inputs((2, 7, 300), 0)
        emulated_line_scan(module, inputs, grad, None, "forward", 0, h_short=True)
        results = {"out_of_bounds_went_unnoticed": True}
    else:
        results = run_all(module, args.planted)
    results["build_seconds"] = built - started
    results["run_seconds"] = time.perf_counter() - built
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
