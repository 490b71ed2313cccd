"""How recognisable are the demo's samples? A classifier's accuracy on them, GSPN-DiT against DiT (attention).

A small CNN is trained on fresh images of the built-in shapes dataset (another seed than the one the
diffusion models see), checked on held-out real images, then applied to class-conditional samples
of two models trained with the demo's config and the same budget (steps, batch, widths, depth):
the GSPN mixer and the attention mixer. The accuracy is the fraction of samples the classifier
assigns to the class they were drawn for (chance: 10%).

Each class has its own colour, so a classifier can be right from colour alone. ``shape_accuracy``
is the same measure from a second classifier that sees only each image's silhouette (its grey
levels stretched to [0, 1] per image, so colour and brightness carry no class): it is high only
where the shapes themselves are drawn right.

    python -m benchmarks.demo_quality --out benchmarks/results/demo_quality.json
    # equal steps, three seeds (data, initial weights, noise and the classifiers follow the seed):
    python -m benchmarks.demo_quality --seeds 0 1 2 train.steps=700 train.time_limit_minutes=null

With ``--seeds`` every model is trained and scored once per seed, and ``summary`` gives each model's
mean and standard deviation over the seeds.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("GOMP_SPINCOUNT", "10000")  # as the demo (dit_gspn/demo.py says why)

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def shape_classifier() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


def silhouette(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) images in [-1, 1] -> (B, 3, H, W) grey silhouettes: the channel mean stretched per image
    so that its 2nd and 98th percentiles map to 0 and 1 (which colour a shape has, and how bright it is,
    no longer tell the classes apart)."""
    grey = images.mean(dim=1, keepdim=True)
    flat = grey.flatten(1)
    lo = flat.quantile(0.02, dim=1).view(-1, 1, 1, 1)
    hi = flat.quantile(0.98, dim=1).view(-1, 1, 1, 1)
    return ((grey - lo) / (hi - lo).clamp(min=1e-3)).clamp(0, 1).expand(-1, 3, -1, -1)


class _View(nn.Module):
    def __init__(self, view, net):
        super().__init__()
        self.view, self.net = view, net

    def forward(self, x):
        return self.net(self.view(x))


def train_classifier(image_size: int, per_class: int, epochs: int, seed: int,
                     view=None) -> tuple[nn.Module, float]:
    """(classifier, its accuracy on held-out real shapes), trained on shapes from ``seed`` (with flips).

    ``view``: a map applied to every image before the classifier sees it (e.g. ``silhouette``).
    """
    from dit_gspn.data import ShapesDataset

    torch.manual_seed(seed)
    train_set = ShapesDataset(num_per_class=per_class, image_size=image_size, seed=seed, flip=True)
    test_set = ShapesDataset(num_per_class=max(20, per_class // 5), image_size=image_size, seed=seed + 1)
    net = shape_classifier() if view is None else _View(view, shape_classifier())
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    loader = torch.utils.data.DataLoader(train_set, batch_size=64, shuffle=True)
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()
    net.eval()
    x, y = zip(*(test_set[i] for i in range(len(test_set))))
    with torch.no_grad():
        accuracy = (net(torch.stack(x)).argmax(1) == torch.tensor(y)).float().mean().item()
    return net, accuracy


def evaluate_model(spec: str, config_path: Path, overrides: list[str], run_dir: Path, classifiers: dict,
                   samples_per_class: int, sample_steps: int, seed: int) -> dict:
    """Train the model ``spec`` names with the demo config, then score its EMA's samples (``score_samples``).

    ``spec`` is a zoo name, optionally followed by overrides of its own: ``GSPN-S/4,model.gspn_gate_groups=null``.
    """
    from accelerate.state import AcceleratorState, PartialState

    from dit_gspn.training import load_config, train
    from dit_gspn.training.config import resolve_objective

    name, *own_overrides = spec.split(",")
    config = resolve_objective(load_config(config_path, [*overrides, *own_overrides, f"model.name={name}",
                                                         f"run_dir={run_dir}"]))
    start = time.perf_counter()
    result = train(config)
    train_seconds = time.perf_counter() - start
    AcceleratorState._reset_state(True)
    PartialState._reset_state()
    return {
        "model": spec, "params": sum(p.numel() for p in result.ema.parameters()),
        "train_steps": result.step, "train_seconds": round(train_seconds, 1), "final_loss": round(result.loss, 4),
        **score_samples(result.ema.eval(), config, classifiers, samples_per_class, sample_steps, seed),
        "checkpoint": str(result.checkpoint), "grid": str(result.grid),
    }


def evaluate_checkpoint(checkpoint: Path, config: dict, classifiers: dict, samples_per_class: int,
                        sample_steps: int, seed: int) -> dict:
    """Score the EMA of an existing training checkpoint (e.g. the snapshots of one long run)."""
    from dit_gspn.checkpoint import read_trainer_state
    from dit_gspn.sampling.model_loader import load_model

    ema, _ = load_model(checkpoint, weights="ema")
    return {"checkpoint": str(checkpoint), "train_steps": int(read_trainer_state(checkpoint)["step"]),
            **score_samples(ema, config, classifiers, samples_per_class, sample_steps, seed)}


def score_samples(ema: nn.Module, config: dict, classifiers: dict, samples_per_class: int, sample_steps: int,
                  seed: int) -> dict:
    """Draw ``samples_per_class`` samples per class with the config's sampler and CFG; for each named
    classifier, the fraction it assigns to the class they were drawn for, overall and per class."""
    from dit_gspn.sampling import sample
    from dit_gspn.vae import decode

    labels = torch.arange(10).repeat(samples_per_class)
    start = time.perf_counter()
    with torch.no_grad():
        images = torch.cat([
            decode(sample(ema, chunk, sampler=config["logging"]["sampler"], num_steps=sample_steps,
                          cfg_scale=float(config["logging"]["cfg_scale"]),
                          generator=torch.Generator().manual_seed(seed + i),
                          clip_denoised=_pixel_info(config).clip_denoised),
                   _pixel_info(config))
            for i, chunk in enumerate(labels.split(100))])
        sample_seconds = time.perf_counter() - start
        scores = {"sample_seconds": round(sample_seconds, 1), "num_samples": len(labels)}
        for key, classifier in classifiers.items():
            correct = (classifier(images).argmax(1) == labels).float()
            scores[key] = round(correct.mean().item(), 4)
            scores[f"per_class_{key}"] = [round(correct[labels == c].mean().item(), 3) for c in range(10)]
    return scores


def train_classifiers(config: dict, args, seed: int) -> tuple[dict, dict]:
    """The colour and the silhouette classifier for ``seed``, and their accuracies on held-out real shapes."""
    classifiers, real_accuracy = {}, {}
    for key, view in (("accuracy", None), ("shape_accuracy", silhouette)):
        classifiers[key], real_accuracy[key] = train_classifier(
            int(config["data"]["image_size"]), args.classifier_per_class, args.classifier_epochs,
            seed=10_000 + seed, view=view)
        print(f"seed {seed}: {key} of its classifier on held-out real shapes: {real_accuracy[key]:.3f}", flush=True)
    return classifiers, real_accuracy


def summarize(results: list[dict]) -> dict:
    """Per model: how many runs, and the mean and standard deviation (over seeds) of each accuracy and the loss."""
    summary = {}
    for name in dict.fromkeys(r["model"] for r in results if "model" in r):
        runs = [r for r in results if r.get("model") == name]
        entry = {"runs": len(runs)}
        for key in ("accuracy", "shape_accuracy", "final_loss", "train_steps"):
            values = [r[key] for r in runs if key in r]
            if values:
                entry[f"{key}_mean"] = round(statistics.fmean(values), 4)
                entry[f"{key}_std"] = round(statistics.stdev(values), 4) if len(values) > 1 else 0.0
        summary[name] = entry
    return summary


def _pixel_info(config):
    from dit_gspn.checkpoint import SamplingInfo
    size = int(config["data"]["image_size"])
    return SamplingInfo(vae=None, latent_scale=1.0, image_size=(size, size), num_classes=10)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    parser.add_argument("--models", nargs="+", default=None,
                        help="zoo names to compare (default: the demo's GSPN model and its DiT twin), each "
                             "optionally with overrides of its own: GSPN-S/4,model.gspn_gate_groups=null")
    parser.add_argument("--samples-per-class", type=int, default=20)
    parser.add_argument("--sample-steps", type=int, default=None, help="default: the config's logging.sample_steps")
    parser.add_argument("--classifier-per-class", type=int, default=300)
    parser.add_argument("--classifier-epochs", type=int, default=3)
    parser.add_argument("--seeds", nargs="+", type=int, default=None,
                        help="train and score every model once per seed (overrides the config's seed)")
    parser.add_argument("--runs", default=None, help="where the two training runs go (default: a temp folder)")
    parser.add_argument("--checkpoints", nargs="+", default=None, metavar="DIR",
                        help="score these training checkpoints instead of training (e.g. one run's snapshots)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "demo_quality.json"))
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="applied to both models")
    args = parser.parse_args(argv)

    from dit_gspn.diffusion import FLOW_SAMPLERS
    from dit_gspn.training import load_config
    from dit_gspn.training.config import resolve_objective

    config = resolve_objective(load_config(args.config, args.overrides))
    gspn_name = config["model"]["name"]
    models = args.models or [gspn_name, gspn_name.replace("GSPN-", "DiT-")]
    sample_steps = args.sample_steps or int(config["logging"]["sample_steps"])
    seeds = args.seeds or [int(config["seed"])]
    results, real_accuracy = [], {}
    for seed in seeds:
        overrides = [*args.overrides, f"seed={seed}"] if args.seeds else args.overrides
        classifiers, real_accuracy[seed] = train_classifiers(config, args, seed)
        if args.checkpoints:
            for checkpoint in args.checkpoints:
                results.append({"seed": seed, **evaluate_checkpoint(Path(checkpoint), config, classifiers,
                                                                    args.samples_per_class, sample_steps, seed=seed)})
                print(json.dumps(results[-1]), flush=True)
            continue
        runs = Path(args.runs or tempfile.mkdtemp(prefix="demo_quality_"))
        for name in models:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            run_dir = runs / f"{name.split(',')[0].replace('/', '_')}-s{seed}-{stamp}"
            results.append({"seed": seed, **evaluate_model(name, Path(args.config), overrides, run_dir, classifiers,
                                                           args.samples_per_class, sample_steps, seed=seed)})
            print(json.dumps(results[-1]), flush=True)
    report = {
        "what": "accuracy of a CNN trained on real built-in shapes, applied to class-conditional samples "
                "(chance 0.1); shape_accuracy: the same from a CNN that sees only silhouettes (no colour); "
                "the models trained with the same config and budget",
        "command": "python -m benchmarks.demo_quality " + " ".join(argv if argv is not None else sys.argv[1:]),
        "config": str(args.config), "overrides": args.overrides, "objective": config["train"]["objective"],
        "sampler": config["logging"]["sampler"],
        "sample_steps": sample_steps, "cfg_scale": float(config["logging"]["cfg_scale"]),
        "clip_denoised": config["logging"]["sampler"] not in FLOW_SAMPLERS,  # the flow samplers do not clip
        "seeds": seeds,
        "classifier_real_accuracy": {str(seed): {key: round(value, 4) for key, value in accuracies.items()}
                                     for seed, accuracies in real_accuracy.items()},
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
        "results": results,
        "summary": summarize(results),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
