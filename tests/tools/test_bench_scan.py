"""benchmarks/bench_scan.py: seconds-long smoke runs that time every line_scan and gspn_scan implementation of this
device and write the JSON the results tables are made from."""
import json

from benchmarks import bench_scan


def test_bench_scan_smoke_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    bench_scan.main(["--smoke", "--device", "cpu", "--shapes", "2,4,8,12", "--no-gspn-scan", "--out", str(out)])
    results = json.loads(out.read_text())
    assert results["copy_bandwidth_gbps"] > 0
    impls = {r["impl"] for r in results["line_scan"]}
    assert impls == {"cpu", "reference"}
    for record in results["line_scan"]:
        assert record["shape"] == [2, 4, 8, 12]
        for phase, per_element in bench_scan.LINE_SCAN_BYTES.items():
            t = record[phase]
            assert t["median_ms"] > 0 and t["bytes"] == per_element * 2 * 4 * 8 * 12 * 4
            assert t["gbps"] > 0 and t["fraction_of_copy_bandwidth"] > 0
    (speedup,) = results["speedups"]
    assert speedup["impl"] == "cpu" and speedup["forward_backward"] > 0


def test_bench_scan_smoke_times_every_gspn_scan_implementation(tmp_path):
    out = tmp_path / "bench_scan.json"
    bench_scan.main(["--smoke", "--device", "cpu", "--shapes", "1,4,6,5", "--repeat", "1", "--out", str(out)])
    results = json.loads(out.read_text())
    records = {r["impl"]: r for r in results["gspn_scan"]}
    assert set(records) == {"cpu", "composed", "reference"}
    for record in records.values():
        assert "error" not in record, record
        for phase in ("forward", "backward", "forward_backward"):
            assert record[phase]["median_ms"] > 0 and record[phase]["gbps"] > 0
            assert record[phase]["fraction_of_copy_bandwidth"] > 0
