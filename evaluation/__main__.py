"""python -m evaluation SAMPLES [REFERENCE] [--report report.json]: FID / IS / KID / precision-recall.

SAMPLES and REFERENCE are each a folder of images, an ADM-layout .npz (arr_0 uint8 N x H x W x 3), or a
statistics .npz (mu, sigma: ADM's VIRTUAL_imagenet256_labeled.npz, or one written with --save-stats).

    python -m evaluation samples.npz VIRTUAL_imagenet256_labeled.npz --report fid.json
    python -m evaluation real_images/ --save-stats real_stats.npz          # reference statistics, once
    python -m evaluation samples.npz real_stats.npz --metrics fid
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from dit_gspn.cli import ArgumentParser, check_output_path, run_main

from .fidelity import FEATURE_LAYERS, METRICS, Settings, evaluate
from .weights import ENV_WEIGHTS

DEFAULT_CACHE = Path(".cache") / "evaluation"


def parse_args(argv=None):
    p = ArgumentParser(prog="python -m evaluation", description=__doc__)
    p.add_argument("samples", help="folder of images, ADM .npz, or statistics .npz")
    p.add_argument("reference", nargs="?", default=None, help="the same kinds; omit for IS only / --save-stats")
    p.add_argument("--metrics", nargs="+", choices=METRICS, default=None,
                   help="default: every metric the inputs allow (fid needs two inputs; isc, kid, prc images)")
    p.add_argument("--weights", default=None,
                   help=f"Inception-v3 state dict for torch-fidelity (else ${ENV_WEIGHTS}, else its download)")
    p.add_argument("--extractor", default=None,
                   help="a TorchScript feature extractor instead of Inception: uint8 (B, 3, H, W) images -> (B, D) "
                        "features, or (features, logits) for IS (e.g. the demo's silhouette classifier)")
    p.add_argument("--report", default=None, help="write the JSON report here (it is printed either way)")
    p.add_argument("--save-stats", default=None, help="write the samples' FID statistics (mu, sigma) to this .npz")
    p.add_argument("--cache-dir", default=str(DEFAULT_CACHE), help="FID statistics cache ('' disables it)")
    p.add_argument("--stats-from-images", action="store_true",
                   help="an .npz holding both arr_0 and mu/sigma: compute FID statistics from its images")
    defaults = Settings()
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--kid-subset-size", type=int, default=defaults.kid_subset_size)
    p.add_argument("--kid-subsets", type=int, default=defaults.kid_subsets)
    p.add_argument("--isc-splits", type=int, default=defaults.isc_splits)
    p.add_argument("--prc-neighborhood", type=int, default=defaults.prc_neighborhood)
    p.add_argument("--feature-layer", choices=FEATURE_LAYERS, default=defaults.feature_layer,
                   help="Inception features for FID, KID and precision/recall (2048 = the standard pool layer)")
    p.add_argument("--device", default=defaults.device)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    for flag in ("report", "save_stats"):
        if getattr(args, flag):
            check_output_path(getattr(args, flag), f"--{flag.replace('_', '-')}")
    if args.device.startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            p.error(f"--device {args.device}: no CUDA GPU is available here; use --device cpu")
    for flag in ("batch_size", "kid_subset_size", "kid_subsets", "isc_splits", "prc_neighborhood"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    settings = Settings(batch_size=args.batch_size, isc_splits=args.isc_splits, kid_subsets=args.kid_subsets,
                        kid_subset_size=args.kid_subset_size, prc_neighborhood=args.prc_neighborhood,
                        device=args.device, stats_from_images=args.stats_from_images,
                        feature_layer=args.feature_layer)
    report = evaluate(args.samples, args.reference, metrics=args.metrics, weights=args.weights,
                      settings=settings, cache_dir=args.cache_dir or None, save_stats=args.save_stats,
                      progress=not args.quiet, extractor=args.extractor)
    for note in report["warnings"]:
        print(f"warning: {note}", file=sys.stderr, flush=True)
    text = json.dumps(report, indent=2)
    if args.report:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
