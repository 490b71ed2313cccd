"""The hot loops' SASS for sm_90 (benchmarks/sass_counts.py, needs nvcc and cuobjdump, not a GPU) and the
performance model built on it (benchmarks/scan_model.py): the loop finder on a listing written by hand,
then the real kernels: no integer division or slow-path call in any innermost loop of the fused scan, every
phase found, and fewer instructions per direction-element than the kernel before this design (the issue's
reading: 282 forward, 755 backward); the model's byte counts against the kernels' traffic worked out by hand."""
import pytest

from benchmarks import sass_counts, scan_model

LISTING = """
        Function : _Z6kernelPf
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   LDG.E R2, desc[UR4][R4.64] ;
        /*0020*/                   MUFU.EX2 R3, R2 ;
        /*0030*/                   STS [R5], R3 ;
        /*0040*/               @P0 BRA 0x10 ;
        /*0050*/                   FFMA R6, R3, R3, R6 ;
        /*0060*/                   LDS R7, [R5] ;
        /*0070*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0080*/              @!P1 BRA 0x50 ;
        /*0090*/                   EXIT ;
"""


def test_the_loop_finder_reads_innermost_loops_and_their_mix():
    (kernel,) = sass_counts.parse_sass(LISTING)
    assert kernel.name == "_Z6kernelPf" and kernel.instructions == 10
    assert [(loop.start, loop.end, loop.instructions) for loop in kernel.loops] == [(0x10, 0x40, 4), (0x50, 0x80, 4)]
    first, second = kernel.loops
    assert first.counts["LDG"] == first.counts["EX2"] == first.counts["STS"] == 1 and first.counts["BAR"] == 0
    assert second.counts["BAR"] == 1 and second.counts["FP32"] == 1 and second.counts["LDS"] == 1


def test_registers_come_from_the_resource_usage_records():
    usage = """
Resource usage:
 Common:
  GLOBAL:0
 Function _Z5otherv:
  REG:40 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:896 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function _Z6kernelPf:
  REG:127 STACK:0 SHARED:1024 LOCAL:0 CONSTANT[0]:680 TEXTURE:0 SURFACE:0 SAMPLER:0
"""
    (kernel,) = sass_counts.parse_sass(LISTING + usage)
    assert kernel.registers == 127 and kernel.instructions == 10
    # 127 registers round up to 128 a thread, 4,096 a warp: 16 warps an SM, 8 blocks of 64 threads, 4 of 128
    assert scan_model.register_limit(127, 64) == 8 and scan_model.register_limit(127, 128) == 4
    assert scan_model.register_limit(72, 256) == 3 and scan_model.register_limit(0, 64) == 32


def test_an_enclosing_loop_is_not_innermost():
    listing = LISTING.replace("@!P1 BRA 0x50", "@!P1 BRA 0x0")  # now the second branch closes a loop around the first
    (kernel,) = sass_counts.parse_sass(listing)
    assert [(loop.start, loop.end) for loop in kernel.loops] == [(0x10, 0x40)]


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


def test_the_model_counts_the_bytes_the_kernels_move():
    # bf16, per-channel gates: forward reads x and 5 gate maps per direction (48) and sums the directions in an
    # fp32 map (write 4, read+write 8, read+write 8, read 4, y 2: 26); split in two groups: 2 x 12 + 8 + 2.
    assert scan_model.moved_bytes("forward", 2, 4, 8, False) == 74
    assert scan_model.moved_bytes("forward", 2, 2, 8, False) == 82
    # backward, tile 4: 5 + 7 input maps per direction (96), 5 gradients per direction (40), checkpoints 4 x 8 / 4.
    assert scan_model.moved_bytes("backward", 2, 4, 4, False) == 96 + 40 + 8 + 26
    assert scan_model.direction_split(64) == 1 and scan_model.direction_split(4096) == 4  # 1 x 64: 256 blocks
    # 256 blocks of 1024-pixel lines: tiles small enough for three blocks per SM; 64 blocks: the whole opt-in.
    assert scan_model.launch("forward", (1, 64, 1024, 1024)).blocks_per_sm >= 3
    assert scan_model.blocks_per_sm_target(64) == 1 and scan_model.smem_share(1) == scan_model.SMEM_PER_BLOCK


def test_the_model_predicts_a_fraction_no_faster_than_the_copy():
    for shape in scan_model.SHAPES:
        for phase in ("forward", "backward"):
            fast = scan_model.predict(phase, shape, instructions=1)
            assert 0 < fast.fraction_of_copy_bandwidth <= 1 + 1e-9
            slow = scan_model.predict(phase, shape, instructions=2000)
            assert slow.fraction_of_copy_bandwidth < fast.fraction_of_copy_bandwidth


@pytest.mark.parametrize("argv, message", [
    (["--instructions", "abc"], "expected FORWARD,BACKWARD"),
    (["--instructions", "1,2,3"], "expected FORWARD,BACKWARD"),
    (["--measured", "/no/such/bench.json"], "--measured: no such file"),
])
def test_the_model_names_a_bad_argument_in_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        scan_model.main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
