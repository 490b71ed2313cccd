"""benchmarks/sass_counts.py, read on a SASS listing written by hand: the innermost loops and their instruction mix,
an enclosing loop not counted as innermost, and registers from the resource-usage records. The real kernels' SASS
is checked in tests/kernels/test_cuda_sass.py."""
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
