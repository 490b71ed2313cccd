"""python -m evaluation SAMPLES [REFERENCE] [--report report.json]: ADM's FID, sFID, Inception Score, precision
and recall (and KID).

SAMPLES and REFERENCE are each a folder of images, an ADM-layout .npz (arr_0 uint8 N x H x W x 3), a statistics
.npz (mu, sigma and, for sFID, mu_s, sigma_s: one written with --save-stats), or both in one file (ADM's
reference batches, e.g. VIRTUAL_imagenet256_labeled.npz: its stored statistics serve FID and sFID, its images
precision and recall).

    python -m evaluation samples.npz VIRTUAL_imagenet256_labeled.npz --report fid.json
    python -m evaluation real_images/ --save-stats real_stats.npz          # reference statistics, once
    python -m evaluation samples.npz real_stats.npz --metrics fid sfid
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from dit_gspn.atomic_write import write_text_atomically
from dit_gspn.cli import ArgumentParser, check_output_file, check_output_folder, command
from dit_gspn.errors import UserError
from dit_gspn.metrics import ENV_WEIGHTS, METRICS, POOL_LAYERS, Settings, evaluate
from dit_gspn.sampling.provenance import read_provenance

DEFAULT_CACHE = Path(".cache") / "evaluation"


def parse_args(argv=None):
    p = ArgumentParser(module="evaluation", description=__doc__)
    p.add_argument("samples", help="folder of images, ADM .npz, or statistics .npz")
    p.add_argument("reference", nargs="?", default=None, help="the same kinds; omit for IS only / --save-stats")
    p.add_argument("--metrics", nargs="+", choices=METRICS, default=None,
                   help="default: every metric the inputs allow (fid and sfid need two inputs; isc images; kid "
                        "and prc images on both sides)")
    p.add_argument("--weights", default=None,
                   help=f"Inception-v3 state dict for torch-fidelity (else ${ENV_WEIGHTS}, else its download)")
    p.add_argument("--extractor", default=None,
                   help="a feature extractor instead of Inception, a torch.export program (.pt2) or a TorchScript "
                        "file: uint8 (B, 3, H, W) images -> (B, D) features, or (features, logits) for IS (e.g. the "
                        "demo's silhouette classifier); no sFID")
    p.add_argument("--report", default=None, help="write the JSON report here (it is printed either way)")
    p.add_argument("--save-stats", default=None,
                   help="write the samples' statistics (mu, sigma, mu_s, sigma_s) to this new .npz")
    p.add_argument("--cache-dir", default=str(DEFAULT_CACHE), help="statistics cache folder ('' disables it)")
    p.add_argument("--stats-from-images", action="store_true",
                   help="an .npz holding both arr_0 and mu/sigma: compute the statistics from its images")
    defaults = Settings()
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--isc-split-size", type=int, default=defaults.isc_split_size,
                   help="Inception Score over consecutive splits of this many samples (ADM: 5000)")
    p.add_argument("--kid-subset-size", type=int, default=defaults.kid_subset_size)
    p.add_argument("--kid-subsets", type=int, default=defaults.kid_subsets)
    p.add_argument("--prc-neighborhood", type=int, default=defaults.prc_neighborhood,
                   help="k of precision/recall's k-nearest-neighbour radii (ADM: 3)")
    p.add_argument("--feature-layer", choices=POOL_LAYERS, default=defaults.feature_layer,
                   help="Inception features for FID, KID and precision/recall (2048 = ADM's pool_3)")
    p.add_argument("--device", default=defaults.device)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    for flag in ("batch_size", "isc_split_size", "kid_subset_size", "kid_subsets", "prc_neighborhood"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.device.startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            p.error(f"--device {args.device}: no CUDA GPU is available here; use --device cpu")
    check_outputs(args)
    return args


def check_outputs(args) -> None:
    """Refuse, before any work, an output that could not be written: a folder where a file goes, a file where
    the cache folder goes, a location that cannot be written. (``evaluate`` refuses an existing --save-stats.)"""
    if args.save_stats:
        check_output_file(args.save_stats, "--save-stats")
        if Path(args.save_stats).suffix != ".npz":
            raise UserError(f"--save-stats {args.save_stats}: the statistics are written as an .npz; name the "
                            f"file *.npz")
    if args.report:
        check_output_file(args.report, "--report")
    if args.cache_dir:
        check_output_folder(args.cache_dir, "--cache-dir")


def with_provenance(report: dict) -> dict:
    """``report`` with each sample ``.npz``'s provenance file (how it was drawn) copied into its input entry."""
    for entry in report["inputs"]:
        if entry["kind"] != "folder":
            provenance = read_provenance(entry["path"])
            if provenance is not None:
                entry["provenance"] = provenance
    return report


def main(argv=None) -> int:
    args = parse_args(argv)
    settings = Settings(batch_size=args.batch_size, isc_split_size=args.isc_split_size,
                        kid_subsets=args.kid_subsets, kid_subset_size=args.kid_subset_size,
                        prc_neighborhood=args.prc_neighborhood, device=args.device,
                        stats_from_images=args.stats_from_images, feature_layer=args.feature_layer)
    report = evaluate(args.samples, args.reference, metrics=args.metrics, weights=args.weights,
                      settings=settings, cache_dir=args.cache_dir or None, save_stats=args.save_stats,
                      progress=not args.quiet, extractor=args.extractor)
    report = with_provenance(report)
    for note in report["warnings"]:
        print(f"warning: {note}", file=sys.stderr, flush=True)
    text = json.dumps(report, indent=2)
    if args.report:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        write_text_atomically(args.report, text + "\n")
    print(text)
    return 0


run = command(main)

if __name__ == "__main__":
    sys.exit(run())
