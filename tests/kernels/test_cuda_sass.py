"""The fused scan's hot loops in SASS for sm_90 (benchmarks/sass_counts.py; needs nvcc and cuobjdump, not a GPU):
no integer division or slow-path call in any innermost loop, every phase found, and fewer instructions per
direction-element than the kernel before this design (282 forward, 755 backward)."""
import pytest

from benchmarks import sass_counts


@pytest.fixture(scope="module")
def kernels():
    try:
        sass = sass_counts.compile_and_disassemble()
    except RuntimeError as exc:
        if "needs nvcc and cuobjdump" in str(exc):
            pytest.skip(str(exc))
        raise
    return {k.name: k for k in sass_counts.parse_sass(sass)}


def fused(kernels, phase, dtype="BFloat16"):
    return next(k for name, k in kernels.items() if f"gspn_scan_{sass_counts.KERNEL_OF[phase]}_kernel" in name
                and dtype in name)


@pytest.mark.slow  # nvcc on the kernel headers: about 30 s on 2 cores
@pytest.mark.parametrize("phase, before", [("forward", 282), ("backward", 755)])
def test_fused_kernels_hot_loops_divide_nothing_and_cost_less_than_before(kernels, phase, before):
    kernel = fused(kernels, phase)
    for loop in kernel.loops:
        assert loop.counts["INT_DIV"] == 0, f"integer division in {loop}"
        assert loop.counts["CALL"] == 0, f"a slow-path call (precise division / expf) in {loop}"
    per_element = sass_counts.gspn_scan_per_element(kernel, phase)
    assert len(per_element) == len(sass_counts.GSPN_PHASES[phase]) + 1
    assert per_element["total"] < before, per_element
    staging = [loop for loop in kernel.loops if loop.counts["EX2"] > 0]
    assert max(loop.counts["LDG"] for loop in staging) >= 4 * 5, "the staging loop does not batch its loads"
