"""The fused scan's hot loops in SASS for sm_90 (benchmarks/sass_counts.py; needs nvcc and cuobjdump, not a GPU):
no integer division or slow-path call in any innermost loop, every phase found, the staging loop's loads batched,
and costs bounded by the kernels' structure: in each phase's hot loop, at most four instructions of addressing,
conversion and control for every one that moves or computes data; and the backward, whose three sweeps (the
checkpoint sweep and the recompute, each the forward's scan again, and the adjoint sweep) each visit every
element once, at most three forwards' instructions per direction-element."""
import pytest

from benchmarks import sass_counts

#: The instruction classes that move or compute data; the rest of a loop is addressing, conversion and control.
WORK = ("LDG", "STG", "LDS", "STS", "EX2", "RCP", "FP32", "BAR")
#: Instructions of addressing, conversion and control a hot loop may spend per instruction of work.
OVERHEAD = 4
#: The backward's sweeps over every element, each at most a forward scan's cost.
BACKWARD_SWEEPS = 3


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
    """Every variant of the fused kernel of ``phase`` (forward or backward) for ``dtype``."""
    found = [k for name, k in kernels.items() if f"gspn_scan_{sass_counts.KERNEL_OF[phase]}_kernel" in name
             and dtype in name]
    assert found, f"no {phase} kernel for {dtype} in {list(kernels)}"
    return found


def hot_loops(kernel, phase) -> dict:
    """{phase name: the innermost loop gspn_scan_per_element counts for it (the fullest batch of its elements)}."""
    loops = {}
    for name, matches, (cls, per_element) in sass_counts.GSPN_PHASES[phase]:
        candidates = [loop for loop in kernel.loops if matches(loop.counts) and loop.counts[cls] >= per_element]
        loops[name] = max(candidates, key=lambda loop: loop.counts[cls])  # the first of the fullest, as it picks
    return loops


@pytest.mark.slow  # nvcc on the kernel headers: about 30 s on 2 cores
@pytest.mark.parametrize("phase", ["forward", "backward"])
def test_fused_kernels_hot_loops_divide_nothing_and_cost_what_their_structure_allows(kernels, phase):
    forward_total = sass_counts.gspn_scan_per_element(fused(kernels, "forward")[0], "forward")["total"]
    for kernel in fused(kernels, phase):
        for loop in kernel.loops:
            assert loop.counts["INT_DIV"] == 0, f"integer division in {loop}"
            assert loop.counts["CALL"] == 0, f"a slow-path call (precise division / expf) in {loop}"
        per_element = sass_counts.gspn_scan_per_element(kernel, phase)
        assert len(per_element) == len(sass_counts.GSPN_PHASES[phase]) + 1
        for name, loop in hot_loops(kernel, phase).items():
            work = sum(loop.counts[cls] for cls in WORK)
            assert loop.instructions <= (1 + OVERHEAD) * work, \
                f"{sass_counts.short_name(kernel.name)} {name}: {loop.instructions} instructions for {work} of work"
        if phase == "backward":
            assert per_element["total"] <= BACKWARD_SWEEPS * forward_total, (per_element, forward_total)
        staging = [loop for loop in kernel.loops if loop.counts["EX2"] > 0]
        assert max(loop.counts["LDG"] for loop in staging) >= 4 * 5, "the staging loop does not batch its loads"
