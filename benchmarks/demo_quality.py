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

REPA with the silhouette classifier's conv features as the encoder (``--repa-encoder`` trains one per seed, on
another seed than the scoring classifiers, and saves it as a torch.export program (.pt2); a model's overrides name it as
``{repa_encoder}``):

    python -m benchmarks.demo_quality --seeds 0 1 2 --repa-encoder --models GSPN-S/4 \
        "GSPN-S/4,repa.block=2,repa.encoder={repa_encoder}" train.steps=200 train.time_limit_minutes=null
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

os.environ.setdefault("GOMP_SPINCOUNT", "10000")  # as the demo (dit_gspn/commands/demo.py says why)

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from dit_gspn.metrics.shapes_classifier import silhouette, silhouette_features, train_classifier  # noqa: E402
from dit_gspn.module_file import save_exported  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def evaluate_model(spec: str, config_path: Path, overrides: list[str], run_dir: Path, classifiers: dict,
                   samples_per_class: int, sample_steps: int, seed: int) -> dict:
    """Train the model ``spec`` names with the demo config, then score its EMA's samples (``score_samples``).

    ``spec`` is a zoo name, optionally followed by overrides of its own:
    ``GSPN-S/4,model.mixer_kwargs.gate_groups=null``.
    """
    from accelerate.state import AcceleratorState, PartialState

    from dit_gspn.training import load_config, train
    from dit_gspn.training.config import parse_config

    name, *own_overrides = spec.split(",")
    config = parse_config(load_config(config_path, [*overrides, *own_overrides, f"model.name={name}",
                                                    f"run_dir={run_dir}"])).to_dict()
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
    """Draw ``samples_per_class`` samples per class with the config's sampler and CFG (``draw_samples``); for each
    named classifier, the fraction it assigns to the class they were drawn for, overall and per class."""
    start = time.perf_counter()
    images, labels = draw_samples(ema, config, samples_per_class, sample_steps, seed)
    scores = {"sample_seconds": round(time.perf_counter() - start, 1), "num_samples": len(labels)}
    return {**scores, **class_accuracies(images, labels, classifiers)}


def draw_samples(ema: nn.Module, config: dict, samples_per_class: int, sample_steps: int,
                 seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(images in [-1, 1], their labels): ``samples_per_class`` samples of each of the 10 classes from ``ema`` with
    the config's sampler and CFG, in chunks of 100 seeded ``seed``, ``seed + 1``, ..."""
    from dit_gspn.sampling import sample
    from dit_gspn.vae import decode

    labels = torch.arange(10).repeat(samples_per_class)
    with torch.no_grad():
        images = torch.cat([
            decode(sample(ema, chunk, sampler=config["logging"]["sampler"], num_steps=sample_steps,
                          cfg_scale=float(config["logging"]["cfg_scale"]),
                          generator=torch.Generator().manual_seed(seed + i),
                          clip_denoised=_pixel_info(config).clip_denoised),
                   _pixel_info(config))
            for i, chunk in enumerate(labels.split(100))])
    return images, labels


def class_accuracies(images: torch.Tensor, labels: torch.Tensor, classifiers: dict) -> dict:
    """For each named classifier, the fraction of ``images`` it assigns to their ``labels``, overall and per class."""
    scores = {}
    with torch.no_grad():
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
    parser.add_argument("--repa-encoder", action="store_true",
                        help="train a silhouette classifier per seed (seed 20000 + seed) and save its conv features "
                             "as a torch.export program (.pt2); model overrides name the file as {repa_encoder}")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "demo_quality.json"))
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="applied to both models")
    args = parser.parse_args(argv)

    from dit_gspn.diffusion import SAMPLERS
    from dit_gspn.training import load_config
    from dit_gspn.training.config import parse_config

    config = parse_config(load_config(args.config, args.overrides)).to_dict()
    gspn_name = config["model"]["name"]
    # attention takes none of GSPN's mixer options
    models = args.models or [gspn_name, gspn_name.replace("GSPN-", "DiT-") + ",model.mixer_kwargs=null"]
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
        encoder_file = ""
        if args.repa_encoder:
            size = int(config["data"]["image_size"])
            classifier, encoder_accuracy = train_classifier(size, args.classifier_per_class, args.classifier_epochs,
                                                            seed=20_000 + seed, view=silhouette)
            real_accuracy[seed]["repa_encoder"] = encoder_accuracy
            encoder_file = str(save_exported(silhouette_features(classifier), torch.zeros(2, 3, size, size),
                                             runs / f"repa_encoder_s{seed}.pt2"))
        for name in [m.replace("{repa_encoder}", encoder_file) for m in models]:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            run_dir = runs / f"{name.split(',')[0].replace('/', '_')}-s{seed}-{stamp}"
            results.append({"seed": seed, **evaluate_model(name, Path(args.config), overrides, run_dir, classifiers,
                                                           args.samples_per_class, sample_steps, seed=seed)})
            results[-1]["model"] = results[-1]["model"].replace(encoder_file, "{repa_encoder}") if encoder_file \
                else results[-1]["model"]
            print(json.dumps(results[-1]), flush=True)
    report = {
        "what": "accuracy of a CNN trained on real built-in shapes, applied to class-conditional samples "
                "(chance 0.1); shape_accuracy: the same from a CNN that sees only silhouettes (no colour); "
                "the models trained with the same config and budget",
        "command": "python -m benchmarks.demo_quality " + " ".join(argv if argv is not None else sys.argv[1:]),
        "config": str(args.config), "overrides": args.overrides, "objective": config["train"]["objective"],
        "sampler": config["logging"]["sampler"],
        "sample_steps": sample_steps, "cfg_scale": float(config["logging"]["cfg_scale"]),
        "clip_denoised": SAMPLERS[config["logging"]["sampler"]].objective != "flow",  # the flow samplers do not clip
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
