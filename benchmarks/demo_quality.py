"""How recognisable are the demo's samples? A classifier's accuracy on them, GSPN-DiT against DiT (attention).

A small CNN is trained on fresh images of the built-in shapes dataset (another seed than the one the
diffusion models see), checked on held-out real images, then applied to class-conditional samples
of two models trained with the demo's config and the same budget (steps, batch, widths, depth):
the GSPN mixer and the attention mixer. The accuracy is the fraction of samples the classifier
assigns to the class they were drawn for (chance: 10%).

    python benchmarks/demo_quality.py --out benchmarks/results/demo_quality.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the demo: no busy-waiting threads on shared cores

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def shape_classifier() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


def train_classifier(image_size: int, per_class: int, epochs: int, seed: int) -> tuple[nn.Module, float]:
    """(classifier, its accuracy on held-out real shapes), trained on shapes from ``seed`` (with flips)."""
    from dit_gspn.data import ShapesDataset

    torch.manual_seed(seed)
    train_set = ShapesDataset(num_per_class=per_class, image_size=image_size, seed=seed, flip=True)
    test_set = ShapesDataset(num_per_class=max(20, per_class // 5), image_size=image_size, seed=seed + 1)
    net = shape_classifier()
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


def evaluate_model(name: str, config_path: Path, overrides: list[str], run_dir: Path, classifier: nn.Module,
                   samples_per_class: int, sample_steps: int, seed: int) -> dict:
    """Train ``name`` with the demo config, sample ``samples_per_class`` per class from its EMA, classify them."""
    from accelerate.state import AcceleratorState, PartialState

    from dit_gspn.sampling import sample
    from dit_gspn.sampling.checkpoint import decode
    from dit_gspn.training import load_config, train

    config = load_config(config_path, [*overrides, f"model.name={name}", f"run_dir={run_dir}"])
    start = time.perf_counter()
    result = train(config)
    train_seconds = time.perf_counter() - start
    AcceleratorState._reset_state(True)
    PartialState._reset_state()

    ema = result.ema.eval()
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
        predicted = classifier(images).argmax(1)
    sample_seconds = time.perf_counter() - start
    correct = (predicted == labels).float()
    return {
        "model": name, "params": sum(p.numel() for p in ema.parameters()),
        "train_steps": result.step, "train_seconds": round(train_seconds, 1), "final_loss": round(result.loss, 4),
        "sample_seconds": round(sample_seconds, 1), "num_samples": len(labels),
        "accuracy": round(correct.mean().item(), 4),
        "per_class_accuracy": [round(correct[labels == c].mean().item(), 3) for c in range(10)],
        "checkpoint": str(result.checkpoint), "grid": str(result.grid),
    }


def _pixel_info(config):
    from dit_gspn.sampling.checkpoint import SamplingInfo
    size = int(config["data"]["image_size"])
    return SamplingInfo(vae=None, latent_scale=1.0, image_size=(size, size), num_classes=10)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    parser.add_argument("--models", nargs="+", default=None,
                        help="zoo names to compare (default: the demo's GSPN model and its DiT twin)")
    parser.add_argument("--samples-per-class", type=int, default=20)
    parser.add_argument("--sample-steps", type=int, default=None, help="default: the config's logging.sample_steps")
    parser.add_argument("--classifier-per-class", type=int, default=300)
    parser.add_argument("--classifier-epochs", type=int, default=3)
    parser.add_argument("--runs", default=None, help="where the two training runs go (default: a temp folder)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "demo_quality.json"))
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="applied to both models")
    args = parser.parse_args(argv)

    from dit_gspn.training import load_config

    config = load_config(args.config, args.overrides)
    gspn_name = config["model"]["name"]
    models = args.models or [gspn_name, gspn_name.replace("GSPN-", "DiT-")]
    sample_steps = args.sample_steps or int(config["logging"]["sample_steps"])
    classifier, real_accuracy = train_classifier(int(config["data"]["image_size"]), args.classifier_per_class,
                                                 args.classifier_epochs, seed=10_000 + int(config["seed"]))
    print(f"classifier accuracy on held-out real shapes: {real_accuracy:.3f}", flush=True)
    runs = Path(args.runs or tempfile.mkdtemp(prefix="demo_quality_"))
    results = []
    for name in models:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        results.append(evaluate_model(name, Path(args.config), args.overrides, runs / f"{name.replace('/', '_')}-{stamp}",
                                      classifier, args.samples_per_class, sample_steps, seed=int(config["seed"])))
        print(json.dumps(results[-1]), flush=True)
    report = {
        "what": "accuracy of a CNN trained on real built-in shapes, applied to class-conditional samples "
                "(chance 0.1); both models trained with the same config and budget",
        "command": "python benchmarks/demo_quality.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "config": str(args.config), "overrides": args.overrides, "sampler": config["logging"]["sampler"],
        "sample_steps": sample_steps, "cfg_scale": float(config["logging"]["cfg_scale"]), "clip_denoised": True,
        "classifier_real_accuracy": round(real_accuracy, 4),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
