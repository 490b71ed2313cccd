"""Peak memory of the two ImageNet-scale jobs against the number of samples N: batch sampling's assembly of the
final ``.npz`` from its shards (``dit_gspn.sampling.batch.assemble``) and the evaluator (``dit_gspn.metrics.
evaluate``, every metric: FID, sFID, IS, precision/recall, KID). Each job runs in a fresh subprocess per N, which
reports its own peak resident set (``VmHWM`` of ``/proc/self/status``: ``ru_maxrss`` is no use here, as Linux
carries the parent's peak into a child's across fork and exec), beside a subprocess that only imports the same
modules (the floor) and, for the smaller N, the assembly as it was before streaming (every shard concatenated in
memory, then ``np.savez``).

    python -m benchmarks.eval_memory --sizes 1000 4000 16000 --image-size 256 \\
        --out benchmarks/results/eval_memory_cpu.json

The shards are synthetic (random pixels, ``--shard-size`` images each, as ``sample.py --batch-size`` cuts them):
drawing them with a model would only add time. The evaluator runs on the samples against a fixed reference of
``--reference-size`` images, with a stand-in for Inception that gives features of ADM's shapes (2048 pool, 2023
spatial, 1008 logits) from a few cheap layers: the memory of the metric code is what is measured, not
Inception's, whose activations depend on the batch size only. The evaluator must keep the samples' pool
features for precision/recall and KID (2048 float32 an image); ``features_mb`` says how much that is.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


# --- the child processes ---------------------------------------------------------------------------------------

class StandInInception:
    """Features of Inception's shapes from cheap layers: pool (2048), spatial (17 x 17 x 7 = 2023), logits (1008)."""

    name = "stand-in for inception-v3 (benchmarks/eval_memory.py)"
    sha256 = "0" * 64
    description = name

    def __init__(self):
        import torch

        generator = torch.Generator().manual_seed(0)
        self.pool = torch.randn(3 * 16, 2048, generator=generator) / 7
        self.spatial = torch.randn(3, 7, generator=generator)
        self.head = torch.randn(2048, 1008, generator=generator) / 45

    def outputs(self, example=None):
        return ("pool", "spatial", "logits")

    def __call__(self, images, wanted=("pool", "spatial", "logits")):
        import torch.nn.functional as F

        x = images.float() / 127.5 - 1
        pool = F.adaptive_avg_pool2d(x, 4).flatten(1) @ self.pool
        found = {"pool": pool.relu()}
        if "spatial" in wanted:
            found["spatial"] = (F.adaptive_avg_pool2d(x, 17).permute(0, 2, 3, 1) @ self.spatial).flatten(1)
        if "logits" in wanted:
            found["logits"] = found["pool"] @ self.head
        return found


def _child(job: str, folder: Path, num_samples: int, shard_size: int) -> None:
    from dit_gspn.metrics import Settings, evaluate
    from dit_gspn.sampling.batch import BatchPlan, assemble, shard_path

    plan = BatchPlan(max(num_samples, 1), 1000, shard_size)
    if job == "assemble":
        assemble(plan, folder / "samples.npz.shards", folder / "samples.npz")
    elif job == "assemble_in_memory":  # the assembly before streaming: everything concatenated, then np.savez
        images, labels = [], []
        for k in range(plan.num_shards):
            with np.load(shard_path(folder / "samples.npz.shards", k)) as data:
                images.append(data["images"])
                labels.append(data["labels"])
        np.savez(folder / "in_memory.npz", np.concatenate(images), np.concatenate(labels))
    elif job == "evaluate":
        report = evaluate(folder / "samples.npz", folder / "reference.npz", extractor=StandInInception(),
                          settings=Settings(device="cpu"))
        (folder / "report.json").write_text(json.dumps(report["metrics"]))
    elif job != "imports":
        raise ValueError(job)
    peak = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM"))
    print(f"peak_rss_kib {int(peak.split()[1])}", flush=True)


# --- the parent ------------------------------------------------------------------------------------------------

def _measure(job: str, folder: Path, num_samples: int, shard_size: int) -> dict:
    """Run one job in a fresh process; its own peak RSS (MiB) and the wall time."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "benchmarks.eval_memory", "--child", job, str(folder),
                           str(num_samples), str(shard_size)], cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="2"),
                          stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{job} at N={num_samples} failed (exit code {done.returncode})")
    peak = int(done.stdout.split("peak_rss_kib")[-1])
    return {"job": job, "num_samples": num_samples, "peak_rss_mb": round(peak / 1024, 1),
            "seconds": round(time.perf_counter() - start, 1)}


def _write_shards(folder: Path, num_samples: int, size: int, shard_size: int, seed: int) -> None:
    """The shards a batch job of ``num_samples`` would leave (the child's plan), with random pixels from ``seed``."""
    from dit_gspn.sampling.batch import BatchPlan, shard_path

    plan = BatchPlan(num_samples, 1000, shard_size)
    shards = folder / "samples.npz.shards"
    shards.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    labels = plan.labels()
    for k in range(plan.num_shards):
        idx = plan.shard_indices(k)
        images = rng.integers(0, 256, (len(idx), size, size, 3), dtype=np.uint8)
        np.savez(shard_path(shards, k), images=images, labels=labels[idx], indices=idx, rank=np.int64(0))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000, 16000])
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--shard-size", type=int, default=64)
    p.add_argument("--reference-size", type=int, default=1000)
    p.add_argument("--in-memory-up-to", type=int, default=4000,
                   help="also run the in-memory assembly (before streaming) for N up to this")
    p.add_argument("--workdir", default=None, help="where the shards and files go (default: a temporary folder)")
    p.add_argument("--out", default=None, help="write the JSON results here")
    p.add_argument("--child", nargs=4, metavar=("JOB", "FOLDER", "N", "SHARD"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        job, folder, n, shard = args.child
        _child(job, Path(folder), int(n), int(shard))
        return {}

    from dit_gspn.hashing import sha256_file

    root = Path(args.workdir or tempfile.mkdtemp(prefix="eval_memory_"))
    results = []
    try:
        reference = root / "reference"
        _write_shards(reference, args.reference_size, args.image_size, args.shard_size, seed=1)
        results.append(dict(_measure("assemble", reference, args.reference_size, args.shard_size), of="reference"))
        shutil.move(reference / "samples.npz", root / "reference.npz")
        shutil.rmtree(reference)
        results.append(_measure("imports", root, 0, args.shard_size))
        for n in args.sizes:
            folder = root / f"n{n}"
            _write_shards(folder, n, args.image_size, args.shard_size, seed=0)
            assembled = _measure("assemble", folder, n, args.shard_size)
            assembled["npz_mb"] = round((folder / "samples.npz").stat().st_size / 2**20, 1)
            results.append(assembled)
            if n <= args.in_memory_up_to:
                results.append(_measure("assemble_in_memory", folder, n, args.shard_size))
                assert sha256_file(folder / "in_memory.npz") == sha256_file(folder / "samples.npz")
                (folder / "in_memory.npz").unlink()
            shutil.rmtree(folder / "samples.npz.shards")
            (folder / "reference.npz").symlink_to(root / "reference.npz")
            evaluated = _measure("evaluate", folder, n, args.shard_size)
            evaluated["features_mb"] = round(n * 2048 * 4 / 2**20, 1)
            evaluated["metrics"] = json.loads((folder / "report.json").read_text())
            results.append(evaluated)
            print(json.dumps([assembled, evaluated]), flush=True)
            shutil.rmtree(folder)
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    report = {
        "what": "peak RSS (MiB) of batch sampling's assembly and of the evaluator against N, one fresh process each",
        "command": "python -m benchmarks.eval_memory " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, no GPU used",
        "image_size": args.image_size, "shard_size": args.shard_size, "reference_size": args.reference_size,
        "results": results,
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
