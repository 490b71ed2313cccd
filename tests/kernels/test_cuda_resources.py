"""ptxas's resource report for sm_90 (H100 / H200): no CUDA kernel variant spills registers to local
memory. Compiles only the kernel headers (no ATen: seconds) for every dtype and column variant the
host code launches; needs nvcc, not a GPU."""
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch.utils.cpp_extension as cpp_extension

from dit_gspn.ops import extension

# Every kernel the .cu files launch: both line_scan column variants (a narrow and a wide row) and
# the fused kernels, for each dtype they dispatch (c10::Half / BFloat16 as in the real build).
KERNELS_TU = r"""
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include "cuda/gspn_scan_bwd.cuh"
#include "cuda/gspn_scan_fwd.cuh"
#include "cuda/line_scan_bwd.cuh"
#include "cuda/line_scan_fwd.cuh"
using namespace gspn;
template <typename S, typename A> void line_scan_variants() {
  for (int64_t W : {64, 2048}) {
    const line_scan_kernels::LaunchShape l = line_scan_kernels::launch_shape(1, W);
    line_scan_kernels::with_fwd_kernel<S, A>(l, [](auto k) { (void)k; });
    line_scan_kernels::with_bwd_kernel<S, A>(l, [](auto k) { (void)k; });
  }
}
template <typename S> void gspn_scan_variants() {
  (void)&cuda_kernels::gspn_scan_fwd_kernel<S>;
  (void)&cuda_kernels::gspn_scan_bwd_kernel<S, true>;
  (void)&cuda_kernels::gspn_scan_bwd_kernel<S, false>;
}
template void line_scan_variants<float, float>();
template void line_scan_variants<double, double>();
template void line_scan_variants<c10::Half, float>();
template void line_scan_variants<c10::BFloat16, float>();
template void gspn_scan_variants<float>();
template void gspn_scan_variants<c10::Half>();
template void gspn_scan_variants<c10::BFloat16>();
"""


def nvcc() -> str | None:
    home = extension.cuda_home()
    candidate = Path(home or "") / "bin" / "nvcc"
    return str(candidate) if candidate.exists() else shutil.which("nvcc")


def parse_ptxas(report: str) -> dict:
    """{kernel (mangled): (registers, spill store bytes, spill load bytes)} from ``ptxas -v`` output."""
    usage, current, spills = {}, None, None
    for line in report.splitlines():
        if m := re.search(r"Compiling entry function '(\w+)'", line):
            current, spills = m.group(1), None
        elif m := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line):
            spills = (int(m.group(1)), int(m.group(2)))
        elif (m := re.search(r"Used (\d+) registers", line)) and current and spills is not None:
            usage[current] = (int(m.group(1)), *spills)
            current = None
    return usage


def test_parse_ptxas_reads_registers_and_spills():
    report = """ptxas info    : Compiling entry function '_Z1kPf' for 'sm_90'
ptxas info    : Function properties for _Z1kPf
    72 bytes stack frame, 68 bytes spill stores, 76 bytes spill loads
ptxas info    : Used 64 registers, used 1 barriers, 72 bytes cumulative stack size"""
    assert parse_ptxas(report) == {"_Z1kPf": (64, 68, 76)}


@pytest.mark.skipif(nvcc() is None, reason="no CUDA toolkit (nvcc) on this machine")
def test_no_kernel_spills_registers_on_sm90(tmp_path):
    source = tmp_path / "kernels.cu"
    source.write_text(KERNELS_TU)
    command = [nvcc(), "-arch=sm_90", "-O3", "--expt-relaxed-constexpr", "-std=c++17", "-Xptxas", "-v",
               f"-I{extension.CSRC}", f"-I{cpp_extension.include_paths()[0]}", "-c", str(source),
               "-o", str(tmp_path / "kernels.o")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    usage = parse_ptxas(result.stderr + result.stdout)
    names = " ".join(usage)
    assert names.count("line_scan_fwd_kernel") == 8 and names.count("line_scan_bwd_kernel") == 8, names
    assert names.count("gspn_scan_fwd_kernel") == 3 and names.count("gspn_scan_bwd_kernel") == 6, names
    spilling = {name: u for name, u in usage.items() if u[1] or u[2]}
    assert not spilling, f"(registers, spill store bytes, spill load bytes): {spilling}"
