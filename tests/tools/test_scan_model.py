"""benchmarks/scan_model.py, the CUDA scan's performance model: the bytes it counts against the kernels' traffic
worked out by hand, launches and occupancy, a predicted fraction of the copy bandwidth that never exceeds 1, and a
bad argument named in one line."""
import pytest

from benchmarks import scan_model


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
