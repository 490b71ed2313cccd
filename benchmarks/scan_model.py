"""Performance model of the fused gspn_scan CUDA kernels on an H200 (PREDICTED: no GPU ran it): HBM bytes
per element as the kernels move them, the launch (blocks, direction split, tile, blocks per SM) as the host
code picks it, and the SASS instruction counts per direction-element of the hot loops
(benchmarks/sass_counts.py), combined into a predicted time and fraction of copy bandwidth.

    python -m benchmarks.scan_model                       # the table, with instruction counts read now (needs nvcc)
    python -m benchmarks.scan_model --instructions 206,559  # with given forward, backward counts
    python -m benchmarks.scan_model --measured bench_scan_gpu.json  # beside what a GPU measured (gpu_check)

Without nvcc (a GPU machine may lack it) the counts come from RECORDED, the last SASS reading committed.

The model (every constant below, each an assumption a GPU run can falsify):
- occupancy: blocks per SM as shared memory, 2048 threads and the register file (the kernels' registers
  per thread, read with the SASS) allow;
- memory: t_mem = bytes / (copy bandwidth x min(1, 2 x busy SMs / SMs)): one SM can draw about twice its
  share of the bandwidth, no more;
- issue: t_issue = warp instructions / (4 schedulers x busy SMs x clock x eta), eta = min(1, resident
  warps per SM / 16): fewer warps than that leave the schedulers waiting on latencies;
- serial chain: t_chain = waves x directions per block x (steps x STEP_CYCLES + tiles x TILE_LOAD_CYCLES)
  / clock: every scan step ends at a barrier, every tile waits for its loads once;
- time = max(t_mem, t_issue, t_chain) when two or more blocks share an SM (one streams while another
  computes), t_mem + t_issue (at least t_chain) with one block per SM;
- fraction = bytes moved / time / copy bandwidth (bytes as counted below, the kernel's real traffic).
Per-plane scratch (the fp32 direction sum, x re-read per direction, the backward's second read of a
direction's inputs) is served by L2 when the planes in flight need at most half of it.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

# H200 SXM (H100 SXM has the same SMs and clock and about 3.35 / 4.8 of the bandwidth).
SMS = 132
CLOCK_HZ = 1.98e9
COPY_BYTES_PER_S = 4.3e12  # device-to-device copy (read + written) seen on the lent H200s (/work/shared/ENVIRONMENT.md)
L2_BYTES = 50e6
SMEM_PER_SM = 233472
SMEM_PER_BLOCK = 232448
MAX_THREADS_PER_SM = 2048
REGISTERS_PER_SM = 65536  # allocated per warp in units of 256
STEP_CYCLES = 90  # barrier + shared load -> 3 FMAs -> shared store, per scan step
TILE_LOAD_CYCLES = 800  # one global load round trip exposed per staged tile

#: The benchmark's GPU shapes (benchmarks/bench_scan.py GPU_SHAPES).
SHAPES = [(32, 4608, 16, 16), (8, 512, 128, 128), (1, 64, 1024, 1024)]
#: The kernel before this design, as read from its SASS (instructions per direction-element, bytes per element).
BEFORE = {"forward": {"instructions": 282, "bytes": "48-74"}, "backward": {"instructions": 755, "bytes": "270-355"}}


def direction_split(planes: int, sms: int = SMS) -> int:
    """Directions per block, as csrc/cuda/gspn_scan_kernel.cuh's direction_split picks them."""
    return 4 if 10 * planes >= 9 * sms else 1


def blocks_per_sm_target(blocks: int, sms: int = SMS) -> int:
    """csrc/cuda/gspn_scan_kernel.cuh's blocks_per_sm_target: 3 when there are blocks for them, 2 past one per SM."""
    return 3 if 10 * blocks >= 18 * sms else (2 if blocks > sms else 1)


def smem_share(per_sm: int) -> int:
    """The shared memory one of ``per_sm`` blocks sharing an SM may take (the runtime reserves 1 KiB a block)."""
    return min(max(SMEM_PER_SM // per_sm - 1024, 0), SMEM_PER_BLOCK)


def threads_for(lanes: int) -> int:
    return min(256, (lanes + 31) // 32 * 32)


def fwd_smem_floats(lanes: int, tile: int) -> int:
    return 2 * (lanes + 2) + 5 * (lanes + 1) * tile


def bwd_smem_floats(lanes: int, tile: int) -> int:
    return (6 + tile + 1) * (lanes + 2) + 11 * (lanes + 1) * tile  # ten slots per element, padded to eleven


def pick_tile(lanes: int, smem_floats, limit: int = SMEM_PER_BLOCK) -> int:
    """The largest power of two <= 16 whose staging fits ``limit`` bytes, or 0."""
    tile = 16
    while tile >= 1 and smem_floats(lanes, tile) * 4 > limit:
        tile //= 2
    return tile


def launch_tile(lanes: int, smem_floats, blocks: int) -> int:
    """csrc/cuda/gspn_scan_kernel.cuh's launch_tile: room for blocks_per_sm_target blocks per SM, else fewer."""
    for per_sm in range(blocks_per_sm_target(blocks), 0, -1):
        if tile := pick_tile(lanes, smem_floats, smem_share(per_sm)):
            return tile
    return 0


@dataclass
class Prediction:
    phase: str
    shape: tuple
    directions_per_block: int
    blocks: int
    tile: int
    blocks_per_sm: int
    bytes_per_element: float
    minimum_bytes_per_element: float
    instructions_per_direction_element: float
    t_mem_ms: float
    t_issue_ms: float
    t_chain_ms: float
    time_ms: float
    fraction_of_copy_bandwidth: float


def moved_bytes(phase: str, s: int, per_block: int, tile: int, l2_resident: bool) -> float:
    """HBM bytes per element that ``phase`` moves for per-channel gates of ``s``-byte elements.

    Forward: each direction reads x and its five gate maps; the direction sum is an fp32 map per group of
    directions (the first writes it, each further one reads and writes it, the last of a whole plane writes
    y instead), and split planes' partial maps are summed by one more pass. Backward: the checkpoint sweep
    reads x, lam, gl, gc, gr, the adjoint sweep those and u, gy, and writes the five gate gradients; dx is
    summed as y is; the checkpoints are one fp32 lane vector per tile, written and read. Resident in L2:
    a plane's repeated reads come from L2 and its fp32 sum map reaches HBM once (written back)."""
    groups = 4 // per_block
    if l2_resident:
        dsum = 4 + s if groups == 1 else 2 * 4 * groups + s
    elif groups == 1:
        dsum = 4 + 8 * 2 + 4 + s  # d0 writes; d1, d2 read and write; d3 reads and writes the output
    else:
        dsum = groups * (4 + 8 * (per_block - 1)) + 4 * groups + s
    if phase == "forward":
        return 20 * s + (1 if l2_resident else 4) * s + dsum
    reads = 20 * s + 2 * s if l2_resident else 4 * (5 + 7) * s
    return reads + 20 * s + 4 * 2 * 4 / tile + dsum


@dataclass
class Launch:
    """How the host code launches one pass at a shape (csrc/cuda/gspn_scan_cuda.cu)."""

    directions_per_block: int
    blocks: int
    tile: int
    threads: int
    blocks_per_sm: int
    l2_resident: bool


def register_limit(registers: int, threads: int) -> int:
    """Blocks of ``threads`` threads of ``registers`` registers each that fit an SM's register file (0: no limit)."""
    if registers <= 0:
        return 32
    per_warp = math.ceil(registers * 32 / 256) * 256
    return REGISTERS_PER_SM // (per_warp * math.ceil(threads / 32))


def launch(phase: str, shape, elem_bytes: int = 2, registers: int = 0) -> Launch:
    """How the host code launches ``phase`` at ``shape``; blocks per SM as shared memory, threads and (given
    the kernel's ``registers`` per thread) the register file allow."""
    B, C, H, W = shape
    planes, lanes = B * C, max(H, W)
    per_block = direction_split(planes)
    blocks = planes * (4 // per_block)
    smem_floats = fwd_smem_floats if phase == "forward" else bwd_smem_floats
    tile = launch_tile(lanes, smem_floats, blocks)
    threads = threads_for(lanes)
    per_sm = max(1, min(SMEM_PER_SM // (smem_floats(lanes, tile) * 4 + 1024), MAX_THREADS_PER_SM // threads, 32,
                        register_limit(registers, threads)))
    # A plane's repeated reads and its fp32 sum map stay in L2 when the resident planes' share fits half of it.
    plane_scratch = H * W * (4 + elem_bytes * (1 if phase == "forward" else 5))
    l2_resident = min(blocks, SMS * per_sm) * plane_scratch <= L2_BYTES / 2
    return Launch(per_block, blocks, tile, threads, per_sm, l2_resident)


def kernel_bytes(phase: str, shape, elem_bytes: int = 2) -> float:
    """HBM bytes the CUDA kernels of ``phase`` move at ``shape`` (per-channel gates), by the model's account."""
    B, C, H, W = shape
    lc = launch(phase, shape, elem_bytes)
    return moved_bytes(phase, elem_bytes, lc.directions_per_block, lc.tile, lc.l2_resident) * B * C * H * W


def predict(phase: str, shape, instructions: float, elem_bytes: int = 2, registers: int = 0) -> Prediction:
    """The model's time and fraction for ``phase`` ("forward" / "backward") of per-channel gates at ``shape``,
    for kernels of ``instructions`` per direction-element and ``registers`` per thread."""
    B, C, H, W = shape
    s = elem_bytes
    elements = B * C * H * W
    lc = launch(phase, shape, s, registers)
    per_block, blocks, tile, threads, per_sm = lc.directions_per_block, lc.blocks, lc.tile, lc.threads, lc.blocks_per_sm
    minimum = s * (1 + 20 + 1) if phase == "forward" else s * (2 + 20 + 21)
    moved = moved_bytes(phase, s, per_block, tile, lc.l2_resident)
    busy = min(SMS, blocks)
    t_mem = moved * elements / (COPY_BYTES_PER_S * min(1.0, 2 * busy / SMS))
    warps = 4 * elements * instructions / 32
    eta = min(1.0, min(per_sm, math.ceil(blocks / SMS)) * threads / 32 / 16)
    t_issue = warps / (4 * busy * CLOCK_HZ * eta)
    waves = math.ceil(blocks / (SMS * per_sm))
    steps = max(H, W)
    sweeps = 1 if phase == "forward" else 3  # backward: the checkpoint sweep, the recompute, the adjoint
    t_chain = waves * per_block * sweeps * (steps * STEP_CYCLES + math.ceil(steps / tile) * TILE_LOAD_CYCLES) / CLOCK_HZ
    time = max(t_mem, t_issue, t_chain) if per_sm >= 2 else max(t_mem + t_issue, t_chain)
    return Prediction(phase, tuple(shape), per_block, blocks, tile, per_sm, moved, minimum, instructions,
                      t_mem * 1e3, t_issue * 1e3, t_chain * 1e3, time * 1e3, moved * elements / time / COPY_BYTES_PER_S)


#: The committed SASS reading (bf16, sm_90) used where nvcc is missing: `python -m benchmarks.sass_counts`.
RECORDED = Path(__file__).resolve().parent / "results" / "scan_model_h200.json"


def measured_kernels() -> dict:
    """{phase: {"instructions": per direction-element, "registers": per thread}} of the bf16 kernels (the
    backward's for per-channel gates, whose gradients it writes in bf16), read from their SASS now."""
    from benchmarks.sass_counts import DIRECT_GATE_GRADS, compile_and_disassemble, gspn_scan_per_element, parse_sass

    kernels = {k.name: k for k in parse_sass(compile_and_disassemble())}
    fwd = next(k for name, k in kernels.items() if "gspn_scan_fwd_kernel" in name and "BFloat16" in name)
    bwd = next(k for name, k in kernels.items()
               if "gspn_scan_bwd_kernel" in name and "BFloat16" in name and DIRECT_GATE_GRADS in name)
    return {phase: {"instructions": gspn_scan_per_element(k, phase)["total"], "registers": k.registers}
            for phase, k in (("forward", fwd), ("backward", bwd))}


def table(predictions: list[Prediction]) -> str:
    rows = ["| phase | shape (B, C, H, W) | dirs/block | blocks | tile | blocks/SM | B/element (min) | instr/dir-elem "
            "| t_mem / t_issue / t_chain ms | predicted fraction |", "|---|---|---:|---:|---:|---:|---:|---:|---|---:|"]
    for p in predictions:
        rows.append(f"| {p.phase} | {p.shape} | {p.directions_per_block} | {p.blocks} | {p.tile} | {p.blocks_per_sm} | "
                    f"{p.bytes_per_element:.0f} ({p.minimum_bytes_per_element:.0f}) | {p.instructions_per_direction_element:.0f} | "
                    f"{p.t_mem_ms:.3f} / {p.t_issue_ms:.3f} / {p.t_chain_ms:.3f} | {100 * p.fraction_of_copy_bandwidth:.0f}% |")
    return "\n".join(rows)


def compare(predictions: list[Prediction], bench: dict) -> str:
    """Predicted against measured fraction (bench_scan's kernel_fraction_of_copy_bandwidth of impl "cuda")."""
    measured = {(tuple(r["shape"]), phase): r[phase].get("kernel_fraction_of_copy_bandwidth")
                for r in bench.get("gspn_scan", []) if r.get("impl") == "cuda" and "error" not in r
                for phase in ("forward", "backward")}
    lines = [f"MEASURED on {bench.get('device', {}).get('name', '?')} ({bench.get('dtype')}), copy "
             f"{bench.get('copy_bandwidth_gbps', 0):.0f} GB/s:"]
    for p in predictions:
        m = measured.get((p.shape, p.phase))
        lines.append(f"  {p.phase:8s} {str(p.shape):22s} predicted {100 * p.fraction_of_copy_bandwidth:5.1f}%  measured "
                     + (f"{100 * m:5.1f}%" if m is not None else "  n/a"))
    return "\n".join(lines)


def instruction_pair(text: str) -> tuple[float, float]:
    """``--instructions``: "FORWARD,BACKWARD", two positive numbers."""
    try:
        pair = tuple(float(v) for v in text.split(","))
    except ValueError:
        pair = ()
    if len(pair) != 2 or min(pair) <= 0:
        raise argparse.ArgumentTypeError(f"expected FORWARD,BACKWARD (two positive numbers), got {text!r}")
    return pair


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instructions", default=None, type=instruction_pair,
                        help="forward,backward instructions per direction-element (default: read the SASS now)")
    parser.add_argument("--json", default=None, help="write the predictions here")
    parser.add_argument("--measured", default=None, help="a bench_scan JSON (GPU) to print beside the predictions")
    args = parser.parse_args(argv)
    if args.measured and not Path(args.measured).is_file():
        parser.error(f"--measured: no such file: {args.measured}")
    if args.json and not Path(args.json).resolve().parent.is_dir():
        parser.error(f"--json: no such folder: {Path(args.json).resolve().parent}")
    try:
        kernels = measured_kernels()
    except RuntimeError as exc:  # no nvcc / cuobjdump here: the committed reading
        recorded = json.loads(RECORDED.read_text())
        kernels = {phase: {"instructions": recorded["instructions"][phase],
                           "registers": recorded.get("registers", {}).get(phase, 0)} for phase in ("forward", "backward")}
        print(f"({exc}; using the SASS counts recorded in {RECORDED.name})")
    if args.instructions:
        for phase, n in zip(("forward", "backward"), args.instructions):
            kernels[phase]["instructions"] = n
    predictions = [predict(phase, shape, kernels[phase]["instructions"], registers=kernels[phase]["registers"])
                   for shape in SHAPES for phase in ("forward", "backward")]
    print("PREDICTED (performance model, no GPU ran it), bf16, per-channel gates, global scan, H200:")
    print(table(predictions))
    if args.measured:
        print(compare(predictions, json.loads(Path(args.measured).read_text())))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"predicted": True, "instructions": {p: k["instructions"] for p, k in kernels.items()},
                       "registers": {p: k["registers"] for p, k in kernels.items()}, "before": BEFORE,
                       "predictions": [asdict(p) for p in predictions]}, f, indent=1)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
