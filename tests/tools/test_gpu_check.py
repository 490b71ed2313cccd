"""The device check's control flow on CPU, with fake steps: it goes on past a failing and a slow
step, the deadline cuts the rest, it ends with one line per step and leaves only its known files."""
import json
import os
import sys

from benchmarks import gpu_check
from benchmarks.gpu_check import Step, run_steps

from helpers.repo import REPO


PY = sys.executable


def fake(name, code, timeout=30, skip=None):
    return Step(name, [PY, "-c", code], timeout, skip)


def test_steps_go_on_past_a_failure_and_a_timeout(tmp_path):
    log = tmp_path / "log"
    steps = [fake("ok", "print('hello from ok')"), fake("fails", "import sys; sys.exit(3)"),
             fake("slow", "import time; time.sleep(60)", timeout=1), fake("absent", "", skip="not on this machine"),
             fake("after", "print('hello from after')")]
    results = run_steps(steps, log, deadline_s=60, env=dict(os.environ))
    assert [r.status for r in results] == ["passed", "failed (exit 3)", "timed out after 1 s",
                                           "skipped: not on this machine", "passed"]
    assert results[2].seconds < 10
    text = log.read_text()
    assert "hello from ok" in text and "hello from after" in text


def test_the_deadline_cuts_a_step_short_and_skips_the_rest(tmp_path):
    steps = [fake("long", "import time; time.sleep(60)", timeout=50), fake("never", "print('ran')")]
    results = run_steps(steps, tmp_path / "log", deadline_s=6, env=dict(os.environ))
    assert results[0].status.startswith("timed out after") and results[0].seconds < 15
    assert results[1].status == "skipped: the deadline has passed"


def test_main_writes_the_log_and_summary_and_one_line_per_step(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.setattr(gpu_check, "plan", lambda args, out, site: [
        fake("fails", "import sys; sys.exit(1)"), fake("slow", "import time; time.sleep(60)", timeout=1),
        fake("writes", f"open({str(out / 'parity.json')!r}, 'w').write('{{}}')"),
        fake("arch", "import os; print('arch list', os.environ['TORCH_CUDA_ARCH_LIST'])")])
    assert gpu_check.main(["--out", str(out), "--deadline", "60"]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and lines[0].startswith("fails") and "failed (exit 1)" in lines[0]
    assert "timed out" in lines[1] and "passed" in lines[2]
    assert "arch list 9.0" in (out / "gpu_check.log").read_text()  # every step sees the one arch list
    assert {p.name for p in out.iterdir()} == {"gpu_check.log", "summary.json", "parity.json"}
    summary = json.loads((out / "summary.json").read_text())
    assert [s["name"] for s in summary["steps"]] == ["fails", "slow", "writes", "arch"]


def test_the_plan_exports_one_arch_list_and_fits_the_output_limit(tmp_path, capsys):
    assert gpu_check.main(["--out", str(tmp_path / "o"), "--dry-run", "--wheels", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    names = [line.split(" ")[0] for line in printed.splitlines()[:-1]]
    assert names == ["wheels", "build", "cuda-tests", "parity", "bench-scan", "scan-model", "bench-model",
                     "memcheck", "racecheck"]
    # the benchmarks run as modules of the benchmarks package, not as script paths
    assert "-m benchmarks.scan_parity" in printed and "-m benchmarks.bench_model" in printed
    assert ".py " not in printed
    assert "wheels (<= 90 s): skipped" in printed and "TORCH_CUDA_ARCH_LIST=" in printed
    assert not (tmp_path / "o").exists()  # a dry run writes nothing
    assert len(gpu_check.OUTPUT_FILES) <= 8


def test_a_bad_deadline_is_one_error_line(tmp_path, capsys):
    assert gpu_check.main(["--out", str(tmp_path), "--deadline", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --deadline")


# As on the GPU image: these packages cannot be imported (nor found) in the child process.
WITHOUT_OPTIONAL_PACKAGES = """
import importlib.abc, importlib.util, sys
BLOCKED = {"diffusers", "torch_fidelity", "importlib_metadata"}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda name, package=None: None if name.split(".")[0] in BLOCKED else find_spec(name, package)
sys.meta_path.insert(0, Block())
import pytest
sys.exit(pytest.main(sys.argv[1:]))
"""


def test_the_cuda_tests_collect_without_diffusers_and_torch_fidelity():
    import subprocess

    root = REPO
    result = subprocess.run([PY, "-c", WITHOUT_OPTIONAL_PACKAGES, "--collect-only", "-q", "-m", "cuda",
                             "-p", "no:cacheprovider", "tests"], cwd=root, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    collected = result.stdout
    assert "tests/kernels/test_gspn_scan_cuda.py::test_cuda_kernel_matches_reference" in collected
    assert "tests/kernels/test_line_scan_cuda.py::test_cuda_kernel_matches_reference" in collected
