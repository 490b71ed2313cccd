"""SASS instruction counts of the CUDA kernels' hot loops for sm_90 (H100 / H200), read without a GPU:
compiles the kernel headers (csrc/cuda/*.cuh, no ATen) with nvcc, disassembles them with cuobjdump and
prints, for every kernel, each innermost loop (a backward branch and its body) with its instruction
count and the instructions that matter for the performance model: global and shared loads/stores,
MUFU (fast exp / reciprocal), floating-point math, barriers, calls (slow paths) and integer division.

    python -m benchmarks.sass_counts                 # table on stdout
    python -m benchmarks.sass_counts --json out.json  # also the loops as JSON

For the fused scan (gspn_scan_per_element) each innermost loop is matched to a phase of the kernel
by its instruction mix (GSPN_PHASES) and divided by the element instances its body holds, counted
from the shared-memory accesses one element makes in that phase (a body the compiler duplicated for
two paths holds two instances of each element): static instructions per element instance, summed
over the phases into instructions per direction-element.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dit_gspn.ops import extension

#: Every kernel the fused scan's host code launches, for the benchmark's dtype (bf16) and float32.
KERNELS_TU = r"""
#include <c10/util/BFloat16.h>
#include "cuda/gspn_scan_bwd.cuh"
#include "cuda/gspn_scan_fwd.cuh"
#include "cuda/line_scan_bwd.cuh"
#include "cuda/line_scan_fwd.cuh"
using namespace gspn;
template <typename S> void variants() {
  (void)&cuda_kernels::gspn_scan_fwd_kernel<S>;
  (void)&cuda_kernels::gspn_scan_bwd_kernel<S, true>;
  (void)&cuda_kernels::gspn_scan_bwd_kernel<S, false>;
  (void)&line_scan_kernels::line_scan_fwd_kernel<S, float, 1, 2>;
  (void)&line_scan_kernels::line_scan_bwd_kernel<S, float, 1, 2>;
}
template void variants<c10::BFloat16>();
template void variants<float>();
"""

#: Instruction classes counted in each loop (matched against the opcode, without predicate or modifiers' tail).
CLASSES = {
    "LDG": r"^LDG\b", "STG": r"^STG\b", "LDS": r"^LDS\b", "STS": r"^STS\b",
    "EX2": r"^MUFU\.EX2\b", "RCP": r"^MUFU\.RCP\b", "FP32": r"^(FFMA|FMUL|FADD|FMNMX|FSETP|FSEL)\b",
    "BAR": r"^BAR\b", "CALL": r"^CALL\b", "INT_DIV": r"^(I2F\.U32\.RP|I2F\.RP|F2I\.FTZ\.U32\.TRUNC)\b",
}


@dataclass
class Loop:
    start: int  # byte address of the first instruction
    end: int  # address of the backward branch
    instructions: int
    counts: dict = field(default_factory=dict)


@dataclass
class Kernel:
    name: str
    instructions: int
    loops: list
    registers: int = 0  # per thread, from ``cuobjdump -res-usage`` (0: not read)


def find_tool(name: str) -> str | None:
    """``name`` (nvcc, cuobjdump) from $CUDA_HOME/bin, PATH, or the copy triton bundles."""
    home = extension.cuda_home()
    for candidate in ([Path(home) / "bin" / name] if home else []):
        if candidate.exists():
            return str(candidate)
    if found := shutil.which(name):
        return found
    try:
        import triton

        bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
        return str(bundled) if bundled.exists() else None
    except ImportError:
        return None


def parse_sass(text: str) -> list[Kernel]:
    """Kernels, their instruction counts and innermost loops from ``cuobjdump -sass`` output (and their
    registers per thread from ``cuobjdump -res-usage`` records in the same text)."""
    kernels, name, body = [], None, []

    def finish():
        if name is not None:
            kernels.append(Kernel(name, len(body), innermost_loops(body)))

    registers, usage_of = {}, None
    for line in text.splitlines():
        if m := re.search(r"Function : (\S+)", line):
            finish()
            name, body = m.group(1), []
        elif m := re.match(r"\s*Function (\S+):\s*$", line):  # a -res-usage record
            usage_of = m.group(1)
        elif usage_of is not None and (m := re.search(r"\bREG:(\d+)", line)):
            registers[usage_of], usage_of = int(m.group(1)), None
        elif name is not None and (m := re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)):
            body.append((int(m.group(1), 16), m.group(2)))
    finish()
    for kernel in kernels:
        kernel.registers = registers.get(kernel.name, 0)
    return kernels


def _opcode(instruction: str) -> str:
    return re.sub(r"^@!?U?P\w+\s+", "", instruction).split()[0]


def innermost_loops(body: list[tuple[int, str]]) -> list[Loop]:
    """Loops closed by a backward BRA whose body holds no other backward branch, each with its class counts."""
    spans = []
    for address, instruction in body:
        if _opcode(instruction).startswith("BRA") and (m := re.search(r"0x([0-9a-f]+)", instruction)):
            target = int(m.group(1), 16)
            if target <= address:
                spans.append((target, address))
    loops = []
    for start, end in spans:
        if any(start <= s and e <= end and (s, e) != (start, end) for s, e in spans):
            continue
        ops = [_opcode(i) for a, i in body if start <= a <= end]
        counts = {k: sum(bool(re.match(p, op)) for op in ops) for k, p in CLASSES.items()}
        loops.append(Loop(start, end, len(ops), counts))
    return loops


#: Phases of the fused kernels: (name, test on a loop's counts, the shared accesses one element makes there:
#: (class, count)). Loops matching no phase run once per tile or per direction (checkpoints, pads).
GSPN_PHASES = {
    "forward": [
        ("staging", lambda c: c["EX2"] > 0, ("STS", 5)),  # wl, wc, wr, lam x, u
        ("scan step", lambda c: c["LDG"] == c["STG"] == 0 and c["LDS"] >= 6, ("STS", 2)),  # h, u h
        ("write-out", lambda c: c["STG"] > 0 and c["EX2"] == 0 and c["LDS"] > 0, ("LDS", 1)),  # u h
    ],
    "backward": [
        ("staging, checkpoint sweep", lambda c: c["EX2"] > 0 and c["STS"] == c["EX2"], ("STS", 4)),
        # a step's loads: wl, wc, wr, three neighbours and the drive (lam x; lam and x apart in the recompute)
        ("scan step, checkpoint sweep", lambda c: c["LDG"] == c["STG"] == 0 and c["STS"] * 7 == c["LDS"],
         ("STS", 1)),
        ("staging, adjoint sweep", lambda c: c["EX2"] > 0 and 2 * c["STS"] == 5 * c["EX2"], ("STS", 10)),
        ("recompute step", lambda c: c["LDG"] == c["STG"] == 0 and c["STS"] * 8 == c["LDS"], ("STS", 1)),
        ("adjoint step", lambda c: c["LDG"] == c["STG"] == 0 and c["STS"] > 0 and c["STS"] % 9 == 0, ("STS", 9)),
        ("write-out", lambda c: c["STG"] > 1 and c["EX2"] == 0 and c["LDS"] > 0, ("LDS", 6)),
    ],
}


KERNEL_OF = {"forward": "fwd", "backward": "bwd"}
#: The mangled template argument of gspn_scan_bwd_kernel<S, true>: gate gradients written in the inputs' dtype.
DIRECT_GATE_GRADS = "Lb1E"


def gspn_scan_per_element(kernel: Kernel, phase: str) -> dict:
    """{phase name: static instructions per element instance of its largest matching loop, ..., "total": sum}."""
    result = {}
    for name, matches, (cls, per_element) in GSPN_PHASES[phase]:
        costs = [loop.instructions / (loop.counts[cls] / per_element) for loop in kernel.loops
                 if matches(loop.counts) and loop.counts[cls] >= per_element]
        if not costs:
            raise ValueError(f"no innermost loop of {short_name(kernel.name)} looks like its {name} phase")
        instances = [loop.counts[cls] / per_element for loop in kernel.loops if matches(loop.counts)
                     and loop.counts[cls] >= per_element]
        result[name] = round(costs[instances.index(max(instances))], 1)  # the fullest batch
    result["total"] = round(sum(result.values()), 1)
    return result


def compile_and_disassemble(arch: str = "sm_90") -> str:
    """The SASS of KERNELS_TU for ``arch``, then its resource usage (raises RuntimeError naming a missing tool)."""
    nvcc, cuobjdump = find_tool("nvcc"), find_tool("cuobjdump")
    if nvcc is None or cuobjdump is None:
        raise RuntimeError(f"needs nvcc and cuobjdump (found nvcc={nvcc}, cuobjdump={cuobjdump})")
    import torch.utils.cpp_extension as cpp_extension

    with tempfile.TemporaryDirectory() as tmp:
        source, cubin = Path(tmp) / "kernels.cu", Path(tmp) / "kernels.cubin"
        source.write_text(KERNELS_TU)
        built = subprocess.run([nvcc, f"-arch={arch}", "-O3", "--expt-relaxed-constexpr", "-std=c++17", "-cubin",
                                f"-I{extension.CSRC}", f"-I{cpp_extension.include_paths()[0]}", str(source), "-o",
                                str(cubin)], capture_output=True, text=True, timeout=600)
        if built.returncode != 0:
            raise RuntimeError(f"nvcc failed:\n{built.stderr[-4000:]}")
        return "\n".join(subprocess.run([cuobjdump, flag, str(cubin)], check=True, capture_output=True, text=True).stdout
                         for flag in ("-sass", "-res-usage"))


def short_name(mangled: str) -> str:
    m = re.search(r"(\w+_kernel)I", mangled)
    dtype = "bf16" if "BFloat16" in mangled else ("fp32" if "If" in mangled else "")
    grads = {DIRECT_GATE_GRADS: ", direct gate grads", "Lb0E": ", fp32 gate grads"}
    extra = next((text for code, text in grads.items() if "gspn_scan_bwd" in mangled and code in mangled), "")
    return f"{m.group(1)}<{dtype}{extra}>" if m else mangled


def report(kernels: list[Kernel]) -> str:
    lines = []
    for k in kernels:
        lines.append(f"{short_name(k.name)}: {k.instructions} instructions, {k.registers} registers, "
                     f"{len(k.loops)} innermost loops")
        for loop in k.loops:
            c = " ".join(f"{key}={value}" for key, value in loop.counts.items() if value)
            lines.append(f"  loop 0x{loop.start:04x}-0x{loop.end:04x}: {loop.instructions:4d} instr  {c}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None, help="write the kernels and loops as JSON here")
    parser.add_argument("--sass", type=Path, default=None, help="also write the full SASS listing here")
    args = parser.parse_args(argv)
    for option, path in (("--json", args.json), ("--sass", args.sass)):
        if path is not None and not path.resolve().parent.is_dir():
            parser.error(f"{option}: no such folder: {path.resolve().parent}")
    sass = compile_and_disassemble()
    if args.sass:
        args.sass.write_text(sass)
    kernels = parse_sass(sass)
    print(report(kernels))
    print("\ngspn_scan, static instructions per element instance of each phase (bf16):")
    for k in kernels:
        for phase in ("forward", "backward"):
            if f"gspn_scan_{KERNEL_OF[phase]}_kernel" in k.name and "BFloat16" in k.name:
                print(f"  {short_name(k.name)}: {gspn_scan_per_element(k, phase)}")
    if args.json:
        args.json.write_text(json.dumps([asdict(k) for k in kernels], indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
