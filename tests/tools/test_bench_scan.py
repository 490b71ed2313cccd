"""A seconds-long smoke run of the scan benchmark: it runs, times every line_scan implementation
of this device and writes the JSON the README's tables are made from."""
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
