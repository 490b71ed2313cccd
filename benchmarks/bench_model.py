"""GSPN-DiT against DiT: step times, peak memory and out-of-memory points from 256 to 2048 pixels.

Two sections (``--sections``, default both):

- ``models``: for each size (``--sizes``) and image resolution, GSPN-<size> and DiT-<size>
  (attention through scaled_dot_product_attention): the training step time (forward + backward +
  AdamW step under ``--precision``, batch ``--train-batch``) at each of ``--resolutions``, the
  sampling step time (forward with classifier-free guidance at batch 2 x ``--sample-batch``) at
  each of ``--sample-resolutions`` (default: the same), and the peak memory of each; a model that
  runs out of memory is recorded as such and the sweep goes on. With ``--interleave`` (the default
  on a CPU) both models are built together and their timed steps alternate, so that a shared
  machine's changing load slows both alike; each time is then the median of ``--iters`` steps.
- ``mixer``: the whole GSPN mixer (projections included), forward + backward, with the fused scan
  against the same mixer on the unfused ops (``gspn_scan_impl("composed")``); the target is a 3x
  speed-up.

Defaults by device: on a GPU, B/2 and XL/2 at 256 512 1024 2048 pixels (4-channel latents of
32..256), batch 8 for both steps. On a CPU, the CPU comparison: S/2 and B/2, the training
step at 256 px with batch 4 and the sampling step at 1024 px with batch 1, interleaved (any of
these can be set). JSON goes to ``--out`` (with the device named), a plot of step time and
memory against resolution to ``--plot``. ``--smoke`` runs tiny models at tiny sizes in seconds
(on CPU), to test the script, not to measure anything.

    python -m benchmarks.bench_model --out benchmarks/results/bench_model_gpu.json --plot benchmarks/results/bench_model_gpu.png
    python -m benchmarks.bench_model --device cpu --out benchmarks/results/bench_model_cpu.json

The scan alone (every implementation, GB/s and fraction of the copy bandwidth) is
``benchmarks/bench_scan.py``'s job.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
from pathlib import Path

import torch

from benchmarks.timing import device_description, time_callable
from dit_gspn.host_memory import retain_freed_host_memory
from dit_gspn.models import MODELS, GSPNMixer, create_model
from dit_gspn.ops.gspn_scan import gspn_scan_impl

SECTIONS = ("models", "mixer")
LATENT_CHANNELS = 4
VAE_DOWNSAMPLE = 8


def time_call(fn, device: torch.device, warmup: int, iters: int) -> float:
    """Median time of ``fn()`` in milliseconds (CUDA events on a GPU, the wall clock on CPU)."""
    return time_callable(fn, device, warmup=warmup, repeat=iters)["median_ms"]


def reset_peak_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mib(device: torch.device) -> float | None:
    """Peak allocated memory since the last reset in MiB (None on CPU, where torch does not track it)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return None


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


#: ``--precision``: "bf16" runs every step under bfloat16 autocast, "fp32" in float32.
PRECISIONS = ("bf16", "fp32")


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 matrix products in hardware (any CUDA GPU this project targets;
    a CPU with AVX-512 BF16 or AMX). Elsewhere oneDNN emulates them, about 60x slower than float32 on this
    project's AVX2 machines, so a bf16 comparison there measures the emulation, not the models."""
    if device.type != "cpu":
        return True
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def autocast(device: torch.device, precision: str):
    """The autocast context of ``--precision`` (disabled for fp32)."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


# ----------------------------------------------------------------------------------------------
# models


def bench_model(name: str, resolution: int, args, device: torch.device, overrides: dict) -> dict:
    """Training step (if ``resolution`` is in ``args.resolutions``) and sampling step (if in
    ``args.sample_resolutions``) of zoo model ``name`` at ``resolution`` pixels; OOM is recorded, not raised."""
    latent = resolution // VAE_DOWNSAMPLE
    row = {"model": name, "resolution": resolution, "latent": latent,
           "train_batch": args.train_batch, "sample_batch": args.sample_batch}
    model = optimizer = None
    try:
        with torch.device(device):  # initialise on the device: an XL model's CPU init alone takes many seconds
            model = create_model(name, input_size=latent, in_channels=LATENT_CHANNELS, num_classes=args.num_classes,
                                 **overrides)
        row["params_m"] = sum(p.numel() for p in model.parameters()) / 1e6
        row["tokens"] = (latent // model.patch_size) ** 2
        if resolution in args.resolutions:
            row.update(_bench_training(model, latent, args, device))
        if resolution in args.sample_resolutions:
            row.update(_bench_sampling(model, latent, args, device))
    except Exception as exc:  # noqa: BLE001 -- an OOM anywhere is a result; anything else is re-raised
        if not is_out_of_memory(exc):
            raise
        row["oom"] = True
        row["error"] = str(exc).splitlines()[0][:200]
    finally:
        del model, optimizer
        reset_peak_memory(device)
    return row


def training_step(model, latent: int, args, device: torch.device):
    """One training step of ``model`` (forward + backward + AdamW, in ``--precision``) as a closure."""
    model.train()
    # As the trainer builds it (fused: one kernel per parameter).
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0, fused=device.type in ("cpu", "cuda"))
    n = args.train_batch
    x = torch.randn(n, LATENT_CHANNELS, latent, latent, device=device)
    t = torch.randint(0, 1000, (n,), device=device)
    y = torch.randint(0, args.num_classes, (n,), device=device)

    def step():
        with autocast(device, args.precision):
            out = model(x, t, y)
            # Output carries the learned variance too; an MSE on all of it times the same backward.
            loss = out.float().square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _bench_training(model, latent: int, args, device: torch.device) -> dict:
    step = training_step(model, latent, args, device)
    try:
        reset_peak_memory(device)
        ms = time_call(step, device, args.warmup, args.iters)
        return {"train_step_ms": ms, "train_peak_mib": peak_memory_mib(device), "train_oom": False}
    except Exception as exc:  # noqa: BLE001
        if not is_out_of_memory(exc):
            raise
        return {"train_step_ms": None, "train_peak_mib": None, "train_oom": True}
    finally:
        del step
        reset_peak_memory(device)


def sampling_step(model, latent: int, args, device: torch.device):
    """One sampling step of ``model`` (the CFG forward at batch 2 x sample_batch, in ``--precision``) as a closure."""
    model.eval()
    n = args.sample_batch
    half = torch.randn(n, LATENT_CHANNELS, latent, latent, device=device)
    x = torch.cat([half, half])
    t = torch.full((2 * n,), 500, device=device)
    y = torch.cat([torch.randint(0, args.num_classes, (n,), device=device),
                   torch.full((n,), args.num_classes, device=device)])

    @torch.no_grad()
    def step():
        with autocast(device, args.precision):
            model.forward_with_cfg(x, t, y, cfg_scale=4.0)

    return step


def _bench_sampling(model, latent: int, args, device: torch.device) -> dict:
    step = sampling_step(model, latent, args, device)
    try:
        reset_peak_memory(device)
        ms = time_call(step, device, args.warmup, args.iters)
        return {"sample_step_ms": ms, "sample_peak_mib": peak_memory_mib(device), "sample_oom": False}
    except Exception as exc:  # noqa: BLE001
        if not is_out_of_memory(exc):
            raise
        return {"sample_step_ms": None, "sample_peak_mib": None, "sample_oom": True}


def bench_pair_interleaved(size: str, resolution: int, args, device: torch.device, overrides: dict) -> list[dict]:
    """GSPN-<size> and DiT-<size> at ``resolution`` with their timed steps alternating (a GSPN step, a DiT
    step, ...), so that a shared machine's changing load falls on both alike. Both models stay resident and
    out-of-memory is not caught: for a CPU, where bench_model's one-model-at-a-time sweep cannot compare."""
    latent = resolution // VAE_DOWNSAMPLE
    rows, models = {}, {}
    for family in ("GSPN", "DiT"):
        name = f"{family}-{size}"
        models[family] = create_model(name, input_size=latent, in_channels=LATENT_CHANNELS,
                                      num_classes=args.num_classes, **overrides)
        rows[family] = {"model": name, "resolution": resolution, "latent": latent, "train_batch": args.train_batch,
                        "sample_batch": args.sample_batch,
                        "params_m": sum(p.numel() for p in models[family].parameters()) / 1e6,
                        "tokens": (latent // models[family].patch_size) ** 2}
    for kind, resolutions, make in (("train", args.resolutions, training_step),
                                    ("sample", args.sample_resolutions, sampling_step)):
        if resolution not in resolutions:
            continue
        steps = {family: make(model, latent, args, device) for family, model in models.items()}
        times = {family: [] for family in steps}
        for _ in range(args.warmup):
            for step in steps.values():
                step()
        for _ in range(args.iters):
            for family, step in steps.items():
                times[family].append(time_callable(step, device, warmup=0, repeat=1)["median_ms"])
        for family, row in rows.items():
            row.update({f"{kind}_step_ms": statistics.median(times[family]), f"{kind}_step_ms_each": times[family],
                        f"{kind}_peak_mib": None, f"{kind}_oom": False})
    return [rows["GSPN"], rows["DiT"]]


# ----------------------------------------------------------------------------------------------
# mixer


def bench_mixer(dim: int, resolution: int, patch: int, args, device: torch.device, chunk: int | None) -> dict:
    """The zoo's GSPN mixer (the constructor's defaults) of width ``dim``, forward + backward in ``--precision``:
    fused scan against the composed ops."""
    grid = resolution // VAE_DOWNSAMPLE // patch
    with torch.device(device):
        mixer = GSPNMixer(dim, chunk=chunk)
    settings = {"dim": dim, "gate_groups": mixer.gate_groups, "group_lam_u": mixer.group_lam_u,
                "proxy_ratio": dim // mixer.proxy_dim}
    tokens = torch.randn(args.train_batch, grid * grid, dim, device=device, requires_grad=True)

    def step():
        with autocast(device, args.precision):
            out = mixer(tokens, (grid, grid))
        out.float().sum().backward()

    row = {**settings, "resolution": resolution, "grid": [grid, grid],
           "batch": args.train_batch, "chunk": chunk}
    for impl in ("fused", "composed"):
        try:
            with gspn_scan_impl(None if impl == "fused" else "composed"):
                reset_peak_memory(device)
                row[f"{impl}_ms"] = time_call(step, device, args.warmup, args.iters)
                row[f"{impl}_peak_mib"] = peak_memory_mib(device)
        except Exception as exc:  # noqa: BLE001
            if not is_out_of_memory(exc):
                raise
            row[f"{impl}_ms"] = None
            row[f"{impl}_oom"] = True
    if row.get("fused_ms") and row.get("composed_ms"):
        row["speedup"] = row["composed_ms"] / row["fused_ms"]
    del mixer, tokens
    reset_peak_memory(device)
    return row


# ----------------------------------------------------------------------------------------------
# reporting


#: (size, step, resolution, target DiT time / GSPN time or None where the ratio is only reported).
GOALS = (
    ("XL/2", "train", 256, 1.0), ("XL/2", "train", 1024, 4.0),  # GPU
    ("S/2", "train", 256, 1.0), ("S/2", "sample", 1024, 2.0),  # CPU
    ("B/2", "train", 256, None), ("B/2", "sample", 1024, None),
)


def goals(rows: list[dict]) -> dict:
    """The speed goals (``GOALS``), evaluated where both models were measured: DiT's step time over GSPN's
    (and for training whether GSPN's peak memory is below DiT's, where it is tracked)."""
    def find(model, res):
        return next((r for r in rows if r["model"] == model and r["resolution"] == res), None)

    out = {}
    for size, step, res, target in GOALS:
        g, d = find(f"GSPN-{size}", res), find(f"DiT-{size}", res)
        key = f"{step}_step_ms"
        if not (g and d and g.get(key) and d.get(key)):
            continue
        ratio = d[key] / g[key]
        entry = {"dit_over_gspn_time": round(ratio, 3), "gspn_ms": g[key], "dit_ms": d[key], "target": target}
        if target is not None:
            entry["met"] = ratio >= target
        if step == "train" and g.get("train_peak_mib") and d.get("train_peak_mib"):
            entry["gspn_peak_below_dit"] = g["train_peak_mib"] < d["train_peak_mib"]
        out[f"{size.replace('/', '')}_{step}_{res}px"] = entry
    return out


def plot(report: dict, path: Path) -> None:
    """Train/sample step time and peak memory against resolution, one line per model; OOM marked x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["models"]
    names = sorted({r["model"] for r in rows})
    panels = [("train_step_ms", "training step (ms)"), ("sample_step_ms", "sampling step, CFG (ms)"),
              ("train_peak_mib", "training peak memory (MiB)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
    for ax, (key, label) in zip(axes, panels):
        if not any(r.get(key) for r in rows):  # e.g. memory on CPU, which torch does not track
            ax.set_title(f"{label}: not measured")
            ax.set_axis_off()
            continue
        for name in names:
            pts = sorted((r["resolution"], r.get(key)) for r in rows if r["model"] == name)
            ok = [(res, v) for res, v in pts if v]
            style = "--" if name.startswith("DiT") else "-"
            line = ax.plot([p[0] for p in ok], [p[1] for p in ok], style, marker="o", label=name)[0]
            oom = [r["resolution"] for r in rows if r["model"] == name and r.get(key.split("_")[0] + "_oom")]
            if oom and ok:
                ax.plot(oom, [max(p[1] for p in ok)] * len(oom), "x", color=line.get_color(), markersize=10)
        ax.set_xscale("log", base=2)
        resolutions = sorted({r["resolution"] for r in rows})
        ax.set_xticks(resolutions, [str(r) for r in resolutions])
        ax.minorticks_off()
        ax.set_yscale("log")
        ax.set_xlabel("image resolution (pixels)")
        ax.set_title(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"GSPN-DiT vs DiT on {report['device']['name']} (x: out of memory)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="JSON results file")
    p.add_argument("--plot", type=Path, default=None, help="PNG plot of time and memory against resolution")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    p.add_argument("--sizes", nargs="+", default=None,
                   help="zoo sizes, each run as GSPN- and DiT- (default: B/2 XL/2 on a GPU, S/2 B/2 on a CPU)")
    p.add_argument("--resolutions", nargs="+", type=int, default=None,
                   help="image pixels of the training steps (default: 256 512 1024 2048 on a GPU, 256 on a CPU)")
    p.add_argument("--sample-resolutions", nargs="+", type=int, default=None,
                   help="image pixels of the sampling steps (default: --resolutions on a GPU, 1024 on a CPU)")
    p.add_argument("--train-batch", type=int, default=None, help="default: 8 on a GPU, 4 on a CPU")
    p.add_argument("--sample-batch", type=int, default=None,
                   help="N; the CFG forward runs at 2N (default: 8 on a GPU, 1 on a CPU)")
    p.add_argument("--retain-host-memory", action=argparse.BooleanOptionalAction, default=True,
                   help="keep freed host memory for reuse, as training and sampling do (dit_gspn.host_memory; default: on)")
    p.add_argument("--interleave", action=argparse.BooleanOptionalAction, default=None,
                   help="alternate GSPN's and DiT's timed steps (default: on a CPU)")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="bf16 autocast or float32 (default: bf16 where the device has bf16 hardware, else fp32)")
    p.add_argument("--smoke", action="store_true", help="tiny models and sizes, one iteration: tests the script")
    args = p.parse_args(argv)
    if args.precision is None:
        args.precision = "bf16" if native_bf16(torch.device(args.device)) else "fp32"
    cpu = torch.device(args.device).type == "cpu"
    defaults = {"sizes": ["S/2", "B/2"] if cpu else ["B/2", "XL/2"],
                "resolutions": [256] if cpu else [256, 512, 1024, 2048],
                "train_batch": 4 if cpu else 8, "sample_batch": 1 if cpu else 8, "interleave": cpu}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    unknown = [size for size in args.sizes if f"GSPN-{size}" not in MODELS]
    if unknown:
        sizes = sorted({name.split("-", 1)[1] for name in MODELS})
        p.error(f"--sizes: unknown size {', '.join(unknown)}; the zoo's sizes are {', '.join(sizes)}")
    if args.sample_resolutions is None:
        args.sample_resolutions = [1024] if cpu and args.resolutions == [256] else list(args.resolutions)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    host_memory_retained = retain_freed_host_memory() if args.retain_host_memory else False
    overrides: dict = {}
    if args.smoke:
        args.sizes, args.resolutions, args.sample_resolutions = ["S/2"], [32, 64], [32, 64]
        args.train_batch = args.sample_batch = 1
        args.warmup, args.iters = 0, 1
        overrides = {"depth": 1, "hidden_size": 32, "num_heads": 2}

    report = {"device": device_description(device), "smoke": args.smoke, "torch_threads": torch.get_num_threads(),
              "host_memory_retained": host_memory_retained,
              "precision": args.precision, "native_bf16": native_bf16(device), "config": {k: (str(v) if isinstance(v, Path) else v)
                                                  for k, v in vars(args).items()}}
    if "models" in args.sections:
        resolutions = sorted(set(args.resolutions) | set(args.sample_resolutions))
        report["models"] = []
        for size in args.sizes:
            for resolution in resolutions:
                if args.interleave:
                    rows = bench_pair_interleaved(size, resolution, args, device, overrides)
                else:
                    rows = [bench_model(f"{family}-{size}", resolution, args, device, overrides)
                            for family in ("GSPN", "DiT")]
                for row in rows:
                    report["models"].append(row)
                    print(json.dumps(row), flush=True)
        report["goals"] = goals(report["models"])
        print(json.dumps(report["goals"], indent=1), flush=True)
    if "mixer" in args.sections:
        report["mixer"] = []
        for size in args.sizes:
            dim = {**MODELS[f"GSPN-{size}"].preset, **overrides}["hidden_size"]
            for resolution in args.resolutions:
                row = bench_mixer(dim, resolution, int(size.split("/")[1]), args, device, chunk=None)
                row["size"] = size
                report["mixer"].append(row)
                print(json.dumps(row), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    if args.plot is not None and report.get("models"):
        plot(report, args.plot)
    print(f"wrote {args.out}" + (f" and {args.plot}" if args.plot else ""))
    return report


if __name__ == "__main__":
    main()
