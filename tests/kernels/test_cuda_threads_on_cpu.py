"""The CUDA kernels of both scans, every thread of a block run as a fiber on the CPU
(tests/cuda_emulation/), with the block shapes and tiles their host code launches: forward and
backward equal the float64 reference, bit for bit the same whether the threads (and blocks) run in
forward, reverse, shuffled or alternating order between barriers, under AddressSanitizer (every
tensor a heap block with redzones). The tests of the tests: deleting any one barrier is noticed, and
a write one element past an output aborts under ASan. What this cannot see: warp-level behaviour,
memory ordering between blocks, timing; `make gpu-check` runs the kernels on a GPU."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

EMULATION = Path(__file__).resolve().parent / "cuda_emulation"
sys.path.insert(0, str(EMULATION))
import driver  # noqa: E402

CASES = [("line_scan", c[0]) for c in driver.LINE_SCAN_CASES] + [("gspn_scan", c[0]) for c in driver.GSPN_SCAN_CASES]


def asan_preload() -> str | None:
    """LD_PRELOAD for AddressSanitizer in a Python process (libstdc++ too, or ASan cannot intercept
    C++ exceptions thrown by libraries loaded later), or None without gcc's libasan."""
    try:
        libs = [subprocess.run(["gcc", f"-print-file-name={name}"], capture_output=True, text=True,
                               check=True).stdout.strip() for name in ("libasan.so", "libstdc++.so.6")]
    except (OSError, subprocess.CalledProcessError):
        return None
    return " ".join(libs) if all(os.path.isabs(lib) and os.path.exists(lib) for lib in libs) else None


def run_driver(tmp_path, *flags):
    preload = asan_preload()
    if preload is None:
        pytest.skip("gcc's AddressSanitizer runtime (libasan) is not installed")
    out = tmp_path / "fibers.json"
    env = {**os.environ, "LD_PRELOAD": preload, "ASAN_OPTIONS": "detect_leaks=0"}
    result = subprocess.run([sys.executable, str(EMULATION / "driver.py"), "--out", str(out), *flags],
                            capture_output=True, text=True, env=env, timeout=600)
    return result, out


@pytest.fixture(scope="module")
def asan_runs(tmp_path_factory):
    result, out = run_driver(tmp_path_factory.mktemp("fibers"))
    assert result.returncode == 0, result.stderr[-6000:]
    return json.loads(out.read_text())


@pytest.mark.slow  # the module fixture: one ASan subprocess, about 25 s of CPU for all cases and orders
@pytest.mark.parametrize("op, case", CASES, ids=[f"{op}-{case}" for op, case in CASES])
def test_kernel_threads_match_the_reference_in_every_order(asan_runs, op, case):
    assert asan_runs["asan"], "the emulation did not run under AddressSanitizer"
    runs = [r for r in asan_runs["runs"] if r["op"] == op and r["case"] == case]
    assert [r["order"] for r in runs] == list(driver.ORDERS)
    for r in runs:
        assert r["error"] is None, r
        assert r["max_error"] <= driver.TOLERANCE, r
        assert r["bitwise_equal_to_forward"], f"the result depends on the order of threads and blocks (a race): {r}"


def test_an_out_of_bounds_write_aborts_under_asan(tmp_path):
    result, _ = run_driver(tmp_path, "--out-of-bounds")
    assert result.returncode != 0 and "heap-buffer-overflow" in result.stderr, result.stderr[-3000:]


@pytest.fixture(scope="module")
def library():
    return driver.build()


def test_the_performance_model_launches_the_tiles_the_host_code_picks(library):
    from benchmarks import scan_model

    for shape in [*scan_model.SHAPES, (4, 384, 16, 16), (1, 8, 2048, 2048), (2, 64, 512, 512), (1, 200, 64, 64)]:
        for backward, phase in enumerate(("forward", "backward")):
            launch = scan_model.launch(phase, shape)
            assert launch.tile == library.gspn_scan_launch_tile(backward, max(shape[2:]), launch.blocks), (shape, phase)
    # 1 x 64 planes of 1024 x 1024: 256 blocks on 132 SMs, every one resident at once
    assert all(scan_model.launch(phase, (1, 64, 1024, 1024)).blocks_per_sm >= 2 for phase in ("forward", "backward"))


@pytest.mark.slow  # about 12 s of CPU: 13 barriers x 8 configurations x up to 2 orders
def test_deleting_any_one_barrier_is_noticed(library):
    cases = [driver.Case(library, op, name, seed) for seed, (op, name) in enumerate(CASES)]
    noticed = {}
    for op, kernel, phase, sites in (("line_scan", 1, "fwd", 2), ("line_scan", 2, "bwd", 3),
                                     ("gspn_scan", 1, "fwd", 3), ("gspn_scan", 2, "bwd", 5)):
        _, reached, _ = next(c for c in cases if c.op == op).run("forward")
        assert reached[kernel - 1] == sites, f"{op}_{phase} reaches {reached[kernel - 1]} barrier lines"
        for site in range(sites):
            noticed[f"{op}_{phase} barrier {site}"] = sum(
                any(error is not None or not case.max_error(outputs) <= driver.TOLERANCE
                    for outputs, _, error in (case.run(order, kernel, site) for order in driver.PLANTED_ORDERS))
                for case in cases if case.op == op)
    assert all(noticed.values()), noticed
