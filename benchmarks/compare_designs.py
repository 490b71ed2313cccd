"""Which design is better on the built-in shapes: the GSPN authors' network (aligned, and as released), the
project's GSPN-DiT and DiT (attention), at matched parameter counts, for equal optimizer steps and for equal
wall-clock time, over several seeds.

Every design trains with the demo's recipe (``configs/demo.yaml``: flow matching, batch 32, lr 5e-3, clip 1.0,
EMA) on the same seeded data; only the model section differs (``DESIGNS``: the demo's GSPN-DiT and its DiT twin,
and the authors' network at the width and depth that match their parameter count within 3%). Each run's EMA
draws ``--samples-per-class`` samples of each class with the demo's sampler and guidance, scored by

- ``shape_accuracy`` and ``accuracy``: the silhouette and the colour classifier of ``benchmarks.demo_quality``
  (trained per seed on fresh shapes; chance 0.1);
- ``fid``: the demo's FID monitor's FID (``dit_gspn.training.fid_monitor.shapes_reference``: a silhouette
  classifier's pooled features, against the statistics of the run's own training images), not an Inception FID.

Equal wall-clock time without time limits (a shared machine's load would decide those): every design's training
step (the trainer's: loss, backward, clip, AdamW, EMA) is timed in one process, the designs' steps alternating
after a warm-up, and design i trains ``steps_i = round(budget_seconds / step_seconds_i)`` steps. The budget is
``--budget-seconds``, else ``--steps`` times the first design's step time (its equal-time run is then its
equal-step run, trained once). A run identical to one already made (design, steps, seed) is not trained again.

    nice -n 10 python -m benchmarks.compare_designs --seeds 0 1 2 --steps 150 --threads 1
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("GOMP_SPINCOUNT", "10000")  # as the demo (dit_gspn/commands/demo.py says why)

import torch  # noqa: E402

from benchmarks.demo_quality import class_accuracies, draw_samples, train_classifiers  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

#: The designs compared, by the name the tables use: each one's model section (the rest of the config is shared).
DESIGNS = {
    "GSPN-DiT (ours)": {"name": "GSPN-S/4", "hidden_size": 96, "depth": 4, "num_heads": 4,
                        "mixer_kwargs": {"chunk": None}, "use_pos_embed": True},
    "DiT (attention)": {"name": "DiT-S/4", "hidden_size": 96, "depth": 4, "num_heads": 4, "use_pos_embed": True},
    "GSPN-paper, aligned": {"name": "GSPN-paper-S/4", "hidden_size": 100, "depth": 10, "directions": "aligned",
                            "chunk": 2, "global_layers": 2},
    "GSPN-paper, as released": {"name": "GSPN-paper-S/4", "hidden_size": 100, "depth": 10,
                                "directions": "as_released", "chunk": 2, "global_layers": 0},
}
#: How far a design's parameter count may lie from the first design's.
PARAMETER_TOLERANCE = 0.03
#: What every run overrides in the demo's config: no time limit, no FID monitor, one checkpoint at the end.
RUN_OVERRIDES = ["train.time_limit_minutes=null", "logging.fid_every=0", "logging.tensorboard=false",
                 "logging.samples_per_class=1", "checkpoint.every=1000000000", "checkpoint.keep_last=1"]
SCORES = ("shape_accuracy", "accuracy", "fid", "final_loss")


def design_config(base: dict, model: dict, *, seed: int, steps: int, run_dir: Path | str):
    """``base`` (a loaded config) with the model section ``model``, the seed, the step count and the run folder,
    parsed and resolved: a RunConfig."""
    from dit_gspn.training.config import parse_config

    config = copy.deepcopy(base)
    config.update(model=copy.deepcopy(model), seed=seed, run_dir=str(run_dir))
    config["train"]["steps"] = steps
    return parse_config(config)


def parameter_counts(base: dict, designs: dict) -> dict[str, int]:
    """Each design's parameter count on the base config's data (built on the meta device); a ValueError naming
    the design when one lies more than ``PARAMETER_TOLERANCE`` from the first design's."""
    from dit_gspn.training.trainer import build_model

    configs, data = _configs_and_data(base, designs)
    counts = {}
    for name, config in configs.items():
        with torch.device("meta"):
            counts[name] = sum(p.numel() for p in build_model(config, data).parameters())
    first = next(iter(counts.values()))
    for name, count in counts.items():
        if abs(count / first - 1) > PARAMETER_TOLERANCE:
            raise ValueError(f"{name} has {count:,} parameters, {count / first - 1:+.1%} from {first:,}: more than "
                             f"{PARAMETER_TOLERANCE:.0%}; change its width or depth in DESIGNS")
    return counts


def _configs_and_data(base: dict, designs: dict, seed: int = 0):
    """Each design's RunConfig (seed ``seed``), and the training data they share."""
    from dit_gspn.training.datasets import build_training_data

    configs = {name: design_config(base, model, seed=seed, steps=1, run_dir="unused")
               for name, model in designs.items()}
    return configs, build_training_data(next(iter(configs.values())))


def time_training_steps(base: dict, designs: dict, rounds: int, warmup: int, seed: int = 0) -> dict[str, float]:
    """Seconds per training step of each design (the median of ``rounds``), timed side by side: each round runs one
    step of every design in turn, after ``warmup`` untimed rounds, on one fixed batch of the training data."""
    from dit_gspn.training.ema import make_ema, update_ema
    from dit_gspn.training.trainer import build_model

    configs, data = _configs_and_data(base, designs, seed)
    steps = {}
    for name, config in configs.items():
        tc = config.train
        batch = [data.dataset[i] for i in range(tc.global_batch_size)]
        x, y = torch.stack([b[0] for b in batch]), torch.tensor([b[1] for b in batch])
        torch.manual_seed(seed)
        net = build_model(config, data).train()
        ema = make_ema(net)
        optimizer = torch.optim.AdamW(net.parameters(), lr=tc.lr, betas=tc.betas, weight_decay=tc.weight_decay,
                                      fused=True)
        objective, generator = config.objective, torch.Generator().manual_seed(seed)

        def step(net=net, ema=ema, optimizer=optimizer, objective=objective, generator=generator, tc=tc, x=x, y=y):
            optimizer.zero_grad(set_to_none=True)
            t = objective.sample_timesteps(x.shape[0], generator)
            noise = torch.randn(x.shape, generator=generator)
            objective.losses(net, x, t, dict(y=y), noise)["loss"].mean().backward()
            if tc.grad_clip:
                torch.nn.utils.clip_grad_norm_(net.parameters(), tc.grad_clip)
            optimizer.step()
            update_ema(ema, net, tc.ema_decay)

        steps[name] = step
    times = {name: [] for name in designs}
    for round_ in range(warmup + rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            if round_ >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def equal_time_steps(step_seconds: dict[str, float], budget_seconds: float) -> dict[str, int]:
    """The steps each design trains in ``budget_seconds`` at its measured step time (at least 1)."""
    return {name: max(1, round(budget_seconds / seconds)) for name, seconds in step_seconds.items()}


def fid_against_training_images(images: torch.Tensor, labels: torch.Tensor, fid_files: tuple[Path, Path],
                                folder: Path) -> float:
    """The FID of ``images`` (in [-1, 1]) as the demo's FID monitor computes it: under the silhouette classifier's
    features ``fid_files[0]``, against the training images' statistics ``fid_files[1]``."""
    from dit_gspn.image_npz import to_uint8, write_npz
    from dit_gspn.metrics import Settings, evaluate

    extractor, reference = fid_files
    samples = write_npz(folder / "samples.npz", to_uint8(images), labels.numpy())
    report = evaluate(samples, reference, metrics=["fid"], extractor=extractor, settings=Settings(device="cpu"),
                      cache_dir=None)
    return float(report["metrics"]["fid"])


def train_and_score(config: dict, classifiers: dict, fid_files: tuple[Path, Path], scoring: dict) -> dict:
    """Train the run ``config`` describes, then score its EMA's samples (``scoring``: samples_per_class,
    sample_steps, and the classifiers' settings): the classifiers' accuracies and the FID. The score is kept in the
    run folder (``score.json``) and read back, not remade, when the same run is asked for with the same scoring; a
    run killed after its checkpoint is scored from it."""
    from accelerate.state import AcceleratorState, PartialState

    from dit_gspn.atomic_write import write_text_atomically
    from dit_gspn.checkpoint import read_trainer_state
    from dit_gspn.training import train

    run_dir = Path(config["run_dir"])
    asked = json.loads(json.dumps({"config": config, "scoring": scoring}))
    kept = run_dir / "score.json"
    if kept.is_file():
        previous = json.loads(kept.read_text())
        if {key: previous.get(key) for key in asked} == asked:
            return previous["score"]
    start = time.perf_counter()
    result = train(config, resume="latest")
    train_seconds = time.perf_counter() - start
    AcceleratorState._reset_state(True)
    PartialState._reset_state()
    start = time.perf_counter()
    images, labels = draw_samples(result.ema.eval(), config, scoring["samples_per_class"], scoring["sample_steps"],
                                  int(config["seed"]))
    sample_seconds = time.perf_counter() - start
    score = {"steps": result.step, "train_seconds": round(train_seconds, 1),
             "final_loss": round(read_trainer_state(result.checkpoint)["loss"], 4),
             "sample_seconds": round(sample_seconds, 1), "num_samples": len(labels),
             "fid": round(fid_against_training_images(images, labels, fid_files, run_dir), 3),
             **class_accuracies(images, labels, classifiers), "run_dir": str(run_dir)}
    write_text_atomically(kept, json.dumps({**asked, "score": score}, indent=1) + "\n")
    return score


def summarize(results: list[dict]) -> dict:
    """Per setting: each design's runs and the mean and standard deviation (over seeds) of each score and of the
    steps; the best design by mean shape accuracy and by mean FID, and each other design's Welch t-test p-value
    against it (scipy; with 3 seeds a rough guide)."""
    from scipy.stats import ttest_ind

    summary = {}
    for setting in dict.fromkeys(r["setting"] for r in results):
        runs = {name: [r for r in results if r["setting"] == setting and r["design"] == name]
                for name in dict.fromkeys(r["design"] for r in results if r["setting"] == setting)}
        designs = {}
        for name, own in runs.items():
            designs[name] = {"runs": len(own)}
            for key in (*SCORES, "steps"):
                values = [r[key] for r in own]
                designs[name][f"{key}_mean"] = round(statistics.fmean(values), 4)
                designs[name][f"{key}_std"] = round(statistics.stdev(values), 4) if len(values) > 1 else 0.0
        summary[setting] = {"designs": designs}
        for key, better in (("shape_accuracy", max), ("fid", min)):
            best = better(designs, key=lambda n: designs[n][f"{key}_mean"])
            summary[setting][f"best_{key}"] = best
            for name in designs:
                a, b = [r[key] for r in runs[name]], [r[key] for r in runs[best]]
                p = float("nan")
                if name != best and min(len(a), len(b)) > 1:
                    with warnings.catch_warnings():  # scipy's word on near-identical values (e.g. all at chance)
                        warnings.simplefilter("ignore", RuntimeWarning)
                        p = float(ttest_ind(a, b, equal_var=False).pvalue)
                designs[name][f"{key}_p_vs_best"] = None if math.isnan(p) else round(p, 4)
    return summary


def markdown_table(report: dict) -> str:
    """The summary as a markdown table: a row per design, equal steps then equal time."""
    def cell(entry, key, digits):
        return f"{entry[f'{key}_mean']:.{digits}f} ± {entry[f'{key}_std']:.{digits}f}"

    summary = report["summary"]
    lines = ["| design | parameters | step (ms) | steps | shape acc. | colour acc. | FID | steps (equal time) | "
             "shape acc. | colour acc. | FID |", "|---|---:|---:|---:|---|---|---|---:|---|---|---|"]
    for name in report["designs"]:
        row = [name, f"{report['parameters'][name]:,}", f"{1e3 * report['step_seconds'][name]:.0f}"]
        for setting in ("equal_steps", "equal_time"):
            entry = summary.get(setting, {}).get("designs", {}).get(name)
            if entry is None:
                row += ["", "", "", ""]
                continue
            row += [f"{entry['steps_mean']:.0f}", cell(entry, "shape_accuracy", 3), cell(entry, "accuracy", 3),
                    cell(entry, "fid", 1)]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    parser.add_argument("--designs", nargs="+", default=list(DESIGNS), metavar="NAME",
                        help=f"which of DESIGNS to compare (default: all): {', '.join(repr(n) for n in DESIGNS)}")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps of the equal-steps comparison")
    parser.add_argument("--budget-seconds", type=float, default=None,
                        help="training time per design of the equal-time comparison (default: --steps times the "
                             "first design's step time)")
    parser.add_argument("--timing-rounds", type=int, default=15)
    parser.add_argument("--timing-warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--samples-per-class", type=int, default=10)
    parser.add_argument("--sample-steps", type=int, default=None, help="default: the config's logging.sample_steps")
    parser.add_argument("--classifier-per-class", type=int, default=300)
    parser.add_argument("--classifier-epochs", type=int, default=3)
    parser.add_argument("--runs", default=None, help="where the training runs go (default: a temp folder)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "compare_designs.json"))
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="applied to every design")
    args = parser.parse_args(argv)
    if any(o.startswith("model.") for o in args.overrides):
        parser.error("each design brings its own model section (DESIGNS): model.* overrides do not apply")
    unknown = [name for name in args.designs if name not in DESIGNS]
    if unknown:
        parser.error(f"--designs {unknown[0]!r} is not one of {', '.join(repr(n) for n in DESIGNS)}")
    designs = {name: DESIGNS[name] for name in args.designs}
    if args.threads:
        torch.set_num_threads(args.threads)

    from dit_gspn.training import load_config
    from dit_gspn.training.datasets import build_training_data

    base = load_config(args.config, [*RUN_OVERRIDES, *args.overrides])
    base["model"] = {}  # each design brings its own model section
    first = next(iter(designs))
    logging = design_config(base, designs[first], seed=0, steps=1, run_dir="unused").logging
    sample_steps = args.sample_steps or logging.sample_steps
    counts = parameter_counts(base, designs)
    print("parameters: " + ", ".join(f"{name} {count:,}" for name, count in counts.items()), flush=True)
    step_seconds = time_training_steps(base, designs, args.timing_rounds, args.timing_warmup)
    budget = args.budget_seconds if args.budget_seconds is not None else args.steps * step_seconds[first]
    plans = {"equal_steps": {name: args.steps for name in designs},
             "equal_time": equal_time_steps(step_seconds, budget)}
    print("step seconds: " + ", ".join(f"{n} {s:.3f}" for n, s in step_seconds.items())
          + f"; budget {budget:.1f} s -> steps {plans['equal_time']}", flush=True)

    scoring = {"samples_per_class": args.samples_per_class, "sample_steps": sample_steps,
               "classifier_per_class": args.classifier_per_class, "classifier_epochs": args.classifier_epochs}
    report = {
        "what": "the GSPN authors' network (aligned and as released), GSPN-DiT and DiT at matched parameter counts "
                "on the built-in shapes, for equal optimizer steps and equal training time; shape_accuracy and "
                "accuracy: silhouette and colour classifiers on class-conditional samples (chance 0.1); fid: the "
                "demo's FID monitor's (silhouette-classifier features against the training images), not Inception",
        "command": "python -m benchmarks.compare_designs " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, "
                   f"torch {torch.__version__}",
        "config": str(args.config), "overrides": [*RUN_OVERRIDES, *args.overrides],
        "designs": designs, "parameters": counts,
        "step_seconds": {name: round(s, 6) for name, s in step_seconds.items()},
        "timing": {"rounds": args.timing_rounds, "warmup": args.timing_warmup,
                   "how": "one process, the designs' training steps alternating, median"},
        "budget_seconds": round(budget, 6), "steps": plans,
        "sampler": logging.sampler, "cfg_scale": logging.cfg_scale, **scoring, "seeds": args.seeds,
        "classifier_real_accuracy": {}, "training_runs": 0, "results": [],
    }
    runs = Path(args.runs or tempfile.mkdtemp(prefix="compare_designs_"))
    made = {}
    for seed in args.seeds:
        seed_config = design_config(base, designs[first], seed=seed, steps=1, run_dir="unused")
        classifiers, real_accuracy = train_classifiers(seed_config.to_dict(), args, seed)
        report["classifier_real_accuracy"][str(seed)] = {key: round(value, 4) for key, value in real_accuracy.items()}
        fid_files = build_training_data(seed_config).fid_features(runs / f"fid_s{seed}")
        for setting, plan in plans.items():
            for name, model in designs.items():
                key = (name, plan[name], seed)
                if key not in made:
                    slug = "".join(c if c.isalnum() else "_" for c in name).strip("_")
                    config = design_config(base, model, seed=seed, steps=plan[name],
                                           run_dir=runs / f"{slug}-s{seed}-{plan[name]}steps").to_dict()
                    made[key] = train_and_score(config, classifiers, fid_files, scoring)
                report["results"].append({"setting": setting, "design": name, "seed": seed, **made[key]})
                report["training_runs"] = len(made)
                print(json.dumps({k: v for k, v in report["results"][-1].items() if not k.startswith("per_class")}),
                      flush=True)
                write_report(args.out, report)  # after every run: a kill keeps what was measured
    write_report(args.out, report)
    print(report["markdown"])
    print(f"wrote {args.out}")
    return report


def write_report(path: str | Path, report: dict) -> None:
    """``report`` with its summary and markdown table (of the runs so far) written to ``path`` atomically."""
    from dit_gspn.atomic_write import write_text_atomically

    report["summary"] = summarize(report["results"])
    report["markdown"] = markdown_table(report)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(path, json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
