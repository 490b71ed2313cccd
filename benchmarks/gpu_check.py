"""The device check, sized to fit one call on a lent GPU machine: build the CUDA kernels, run the
``cuda`` tests, a kernel-vs-reference parity summary, the scan and model benchmarks, and tiny
compute-sanitizer runs, each under its own timeout (and the fused scan's performance model's prediction beside
the fraction of copy bandwidth bench_scan measured, into the log) inside one global deadline; go on past a failing
step, end with one line per step (passed / failed / timed out / skipped), and leave at most 8 files
in the output folder: the log, the step summary, the test report, the JSON results and the plot.

    python3 -m benchmarks.gpu_check --out DIR [--deadline 480] [--wheels .whl]   # what `make gpu-check` runs
    python3 -m benchmarks.gpu_check --out DIR --dry-run                            # print the plan only

Every step runs with the same environment: ``TORCH_CUDA_ARCH_LIST`` (default 9.0, H100 / H200) and
one extension cache, so the test process loads the build instead of compiling again. Wheels in
``--wheels`` (``make wheels``: diffusers, torch-fidelity, ... that the GPU image lacks) are installed
into a temporary folder on ``PYTHONPATH`` first; without them the tests that need those packages are
skipped and the model benchmark fails, the rest runs.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DEADLINE_S = 480.0
#: The files a run may leave in the output folder (the device returns at most 8).
OUTPUT_FILES = ("gpu_check.log", "summary.json", "cuda_tests.xml", "parity.json", "bench_scan_gpu.json",
                "bench_model_gpu.json", "bench_model_gpu.png")


@dataclass
class Step:
    """One command of the check; ``timeout_s`` caps it, and the global deadline caps it further."""

    name: str
    argv: list[str]
    timeout_s: float
    skip_reason: str | None = None  # set when the step cannot run here (it is reported as skipped)


@dataclass
class Result:
    name: str
    status: str  # "passed", "failed (exit N)", "timed out after S s", "skipped: why"
    seconds: float
    command: str = ""


def run_steps(steps: list[Step], log_path: Path, deadline_s: float, env: dict, cwd: Path = REPO) -> list[Result]:
    """Run ``steps`` in order, each under min(its timeout, the time left before the deadline), appending
    their output to ``log_path``; a failing or timed-out step does not stop the ones after it. A step
    that would start with less than 5 s left is skipped."""
    started = time.monotonic()
    results = []
    with open(log_path, "a", buffering=1) as log:
        for step in steps:
            left = deadline_s - (time.monotonic() - started)
            command = " ".join(step.argv)
            if step.skip_reason:
                results.append(Result(step.name, f"skipped: {step.skip_reason}", 0.0, command))
                continue
            if left < 5:
                results.append(Result(step.name, "skipped: the deadline has passed", 0.0, command))
                continue
            timeout = min(step.timeout_s, left)
            log.write(f"\n===== {step.name} (timeout {timeout:.0f} s): {command}\n")
            t0 = time.monotonic()
            process = subprocess.Popen(step.argv, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)
            try:
                code = process.wait(timeout=timeout)
                status = "passed" if code == 0 else f"failed (exit {code})"
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)  # the step and every process it started
                process.wait()
                status = f"timed out after {timeout:.0f} s"
            seconds = time.monotonic() - t0
            log.write(f"===== {step.name}: {status} in {seconds:.1f} s\n")
            results.append(Result(step.name, status, seconds, command))
    return results


def check_environment(args, wheel_site: Path | None) -> dict:
    """The environment of every step: one arch list, one extension cache, the repository (and wheels) importable."""
    env = dict(os.environ)
    env.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    env.setdefault("DIT_GSPN_CACHE", str(Path(tempfile.gettempdir()) / "dit_gspn_gpu_check" / "ext"))
    env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(tempfile.gettempdir()) / "dit_gspn_gpu_check" / "inductor"))
    env.setdefault("HF_HUB_OFFLINE", "1")
    env["PYTHONUNBUFFERED"] = "1"
    paths = [str(REPO)] + ([str(wheel_site)] if wheel_site else []) + [p for p in [env.get("PYTHONPATH")] if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def plan(args, out: Path, wheel_site: Path) -> list[Step]:
    """The steps and their sizes. Per-step caps add up to more than the default deadline on purpose:
    the deadline, not the caps, ends the run, and the last steps are the least needed."""
    py = args.python
    wheels = sorted(Path(args.wheels).glob("*.whl")) if args.wheels else []
    sanitizer = shutil.which("compute-sanitizer") or next(
        (str(p) for p in Path("/usr/local").glob("cuda*/bin/compute-sanitizer")), None)
    small = args.deadline < 420  # a short deadline: the benchmarks' smaller sizes
    scan_shapes = "32,4608,16,16;8,512,128,128" + ("" if small else ";1,64,1024,1024")  # bench_scan's GPU_SHAPES
    model_sizes = ["B/2"] if small else ["B/2", "XL/2"]
    model_resolutions = ["256", "512"] if small else ["256", "512", "1024"]
    tiny_parity = [py, "-m", "benchmarks.scan_parity", "--device", "cuda", "--tiny", "--out", os.devnull]
    return [
        Step("wheels", [py, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(wheel_site),
                        *map(str, wheels)], 90, None if wheels else f"no wheels in {args.wheels} (`make wheels`)"),
        Step("build", [py, "-m", "dit_gspn.ops.build", "--cuda"], 240),
        Step("cuda-tests", [py, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "tests",
                            f"--junitxml={out / 'cuda_tests.xml'}"], 200),
        Step("parity", [py, "-m", "benchmarks.scan_parity", "--device", "cuda", "--out", str(out / "parity.json")], 60),
        Step("bench-scan", [py, "-m", "benchmarks.bench_scan", "--device", "cuda", "--shapes", scan_shapes,
                            "--repeat", "10", "--max-seconds", "2", "--out", str(out / "bench_scan_gpu.json")], 120),
        Step("scan-model", [py, "-m", "benchmarks.scan_model", "--measured", str(out / "bench_scan_gpu.json")], 30),
        Step("bench-model", [py, "-m", "benchmarks.bench_model", "--device", "cuda", "--sizes", *model_sizes,
                             "--resolutions", *model_resolutions, "--warmup", "1", "--iters", "3",
                             "--out", str(out / "bench_model_gpu.json"), "--plot", str(out / "bench_model_gpu.png")],
             150),
        Step("memcheck", [sanitizer or "compute-sanitizer", "--tool", "memcheck", "--error-exitcode", "1",
                          *tiny_parity], 60, None if sanitizer else "compute-sanitizer not found"),
        Step("racecheck", [sanitizer or "compute-sanitizer", "--tool", "racecheck", "--error-exitcode", "1",
                           *tiny_parity], 60, None if sanitizer else "compute-sanitizer not found"),
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder (created; at most 8 files land there)")
    parser.add_argument("--deadline", type=float, default=DEFAULT_DEADLINE_S,
                        help=f"seconds for all steps together (default {DEFAULT_DEADLINE_S:.0f})")
    parser.add_argument("--wheels", default=str(REPO / ".whl"), help="folder of wheels to install first")
    parser.add_argument("--python", default=sys.executable, help="the python every step runs (default: this one)")
    parser.add_argument("--dry-run", action="store_true", help="print the steps and the environment, run nothing")
    args = parser.parse_args(argv)
    if args.deadline <= 0:
        print(f"error: --deadline must be a positive number of seconds, got {args.deadline:g}", file=sys.stderr)
        return 2
    if args.out.exists() and not args.out.is_dir():
        print(f"error: --out {args.out} exists and is not a folder", file=sys.stderr)
        return 2
    out = args.out.resolve()
    wheel_site = Path(tempfile.gettempdir()) / "dit_gspn_gpu_check" / "site"
    steps = plan(args, out, wheel_site)
    env = check_environment(args, wheel_site)
    if args.dry_run:
        for step in steps:
            print(f"{step.name} (<= {step.timeout_s:.0f} s){': skipped, ' + step.skip_reason if step.skip_reason else ''}:"
                  f" {' '.join(step.argv)}")
        print(f"deadline {args.deadline:.0f} s; TORCH_CUDA_ARCH_LIST={env['TORCH_CUDA_ARCH_LIST']} "
              f"DIT_GSPN_CACHE={env['DIT_GSPN_CACHE']}")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "gpu_check.log"
    with open(log_path, "w") as log:
        log.write(f"gpu_check: deadline {args.deadline:.0f} s, TORCH_CUDA_ARCH_LIST={env['TORCH_CUDA_ARCH_LIST']}\n")
        if shutil.which("nvidia-smi"):
            log.flush()
            subprocess.run(["nvidia-smi"], stdout=log, stderr=subprocess.STDOUT, check=False)
    results = run_steps(steps, log_path, args.deadline, env)
    summary = {"deadline_s": args.deadline, "arch_list": env["TORCH_CUDA_ARCH_LIST"],
               "steps": [asdict(r) for r in results]}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    stray = sorted(p.name for p in out.iterdir() if p.name not in OUTPUT_FILES)
    lines = [f"{r.name:12s} {r.status} ({r.seconds:.0f} s)" for r in results]
    if stray:
        lines.append(f"warning: unexpected files in {out}: {', '.join(stray)}")
    with open(log_path, "a") as log:
        log.write("\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(r.status == "passed" or r.status.startswith("skipped") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
