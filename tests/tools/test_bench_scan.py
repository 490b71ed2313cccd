"""benchmarks/bench_scan.py: seconds-long smoke runs that time every line_scan and gspn_scan implementation of this
device and write the JSON the results tables are made from. Times cannot be checked against anything, but every
other number of the JSON follows from them and from the run's own inputs: the bytes from the shape and what each
op must read and write (counted here from the ops' contracts), the rates and fractions from the bytes and times,
the speedups from the times."""
import json

import pytest

from benchmarks import bench_scan

FLOAT32 = 4
#: Maps of the input's size each op must read and write, per phase (bench_scan's module docstring).
LINE_SCAN_MAPS = {"forward": 5 + 1,  # x, lam, wl, wc, wr in; h out
                  "backward": 7 + 5}  # grad_h, h and the five inputs in; their five gradients out
GSPN_SCAN_MAPS = {"forward": 1 + 4 * 5 + 1,  # x and five gate maps per direction in; y out
                  "backward": 2 + 4 * 5 + (1 + 4 * 5)}  # grad_y, x and the 20 gate maps in; their 21 gradients out
for maps in (LINE_SCAN_MAPS, GSPN_SCAN_MAPS):
    maps["forward_backward"] = maps["forward"] + maps["backward"]


def assert_rates_follow_from_the_times(timing: dict, maps: int, elements: int, copy_gbps: float, repeat: int):
    """A phase's record: its bytes from the maps it must move, its rates from those bytes and its median time."""
    assert 0 < timing["min_ms"] <= timing["median_ms"] and 1 <= timing["repeats"] <= repeat
    assert timing["bytes"] == maps * elements * FLOAT32
    assert timing["gbps"] == pytest.approx(timing["bytes"] / (timing["median_ms"] * 1e-3) / 1e9, rel=1e-12)
    assert timing["fraction_of_copy_bandwidth"] == pytest.approx(timing["gbps"] / copy_gbps, rel=1e-12)


def test_bench_scan_smoke_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    argv = ["--smoke", "--device", "cpu", "--shapes", "2,4,8,12", "--no-gspn-scan", "--out", str(out)]
    returned = bench_scan.main(argv)
    results = json.loads(out.read_text())
    assert results == returned and results["command"] == "python -m benchmarks.bench_scan " + " ".join(argv)
    assert results["gspn_scan"] == [] and results["dtype"] == "float32"
    records = {r["impl"]: r for r in results["line_scan"]}
    assert set(records) == {"cpu", "reference"} and len(results["line_scan"]) == 2
    for record in records.values():
        assert record["shape"] == [2, 4, 8, 12]
        for phase, maps in LINE_SCAN_MAPS.items():
            assert_rates_follow_from_the_times(record[phase], maps, 2 * 4 * 8 * 12, results["copy_bandwidth_gbps"],
                                               repeat=2)
    (speedup,) = results["speedups"]
    assert (speedup["op"], speedup["impl"], speedup["over"], speedup["shape"]) == ("line_scan", "cpu", "reference",
                                                                                   [2, 4, 8, 12])
    for phase in LINE_SCAN_MAPS:
        assert speedup[phase] == pytest.approx(records["reference"][phase]["median_ms"] /
                                               records["cpu"][phase]["median_ms"], rel=1e-12)


def test_bench_scan_smoke_times_every_gspn_scan_implementation(tmp_path):
    out = tmp_path / "bench_scan.json"
    bench_scan.main(["--smoke", "--device", "cpu", "--shapes", "1,4,6,5", "--repeat", "1", "--out", str(out)])
    results = json.loads(out.read_text())
    records = {r["impl"]: r for r in results["gspn_scan"]}
    assert set(records) == {"cpu", "composed", "reference"}
    for record in records.values():
        assert "error" not in record, record
        assert record["shape"] == [1, 4, 6, 5]
        for phase, maps in GSPN_SCAN_MAPS.items():
            assert_rates_follow_from_the_times(record[phase], maps, 1 * 4 * 6 * 5, results["copy_bandwidth_gbps"],
                                               repeat=1)
            assert "kernel_bytes" not in record[phase]  # the CUDA kernels' own traffic: only for impl "cuda"
