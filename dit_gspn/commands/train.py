"""Train a class-conditional GSPN-DiT (or DiT) from a YAML config, on one device or many (``dit-gspn-train``,
or ``python train.py`` in the checkout).

    python train.py --config configs/demo.yaml                         # one device (CPU or GPU)
    accelerate launch --multi_gpu --num_processes 8 train.py --config configs/gspn_xl2_256.yaml
    python train.py --config configs/demo.yaml train.steps=2000 run_dir=runs/longer   # overrides
    python train.py --config configs/demo.yaml --resume                # continue the newest checkpoint
    python train.py --resume runs/demo/checkpoints/0000200 train.steps=4000   # its config.yaml + overrides

``--resume CHECKPOINT`` takes the checkpoint's own ``config.yaml`` as the base config and applies the
overrides on top (``--config`` is then not read); ``--resume`` alone continues the newest checkpoint of the
``--config`` run.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from dit_gspn.cli import ArgumentParser, command
from dit_gspn.errors import MissingFileError


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--config", default=None,
                        help="YAML file (see configs/); not needed with --resume CHECKPOINT, whose config.yaml is used")
    parser.add_argument("--resume", nargs="?", const="latest", default=None,
                        help="continue the run: alone, from its newest checkpoint; or from the checkpoint folder given")
    parser.add_argument("--allow-config-change", action="store_true",
                        help="resume although the config differs from the checkpoint's in a key that changes the "
                             "run (model, seed, data, optimisation): the run is then no exact continuation")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="e.g. train.lr=2e-4 run_dir=runs/x")
    args = parser.parse_intermixed_args(argv)
    if args.resume not in (None, "latest") and "=" in args.resume and not Path(args.resume).exists():
        args.overrides.insert(0, args.resume)  # `--resume key=value`: the value was an override
        args.resume = "latest"
    if args.config is None and args.resume in (None, "latest"):
        parser.error("--config is required (or --resume CHECKPOINT, whose own config.yaml is the base)")
    return args


def base_config_path(args) -> Path:
    """The YAML the run's config starts from: a resumed checkpoint's own config.yaml, else ``--config``; a path
    of the wrong kind (missing, a file for a folder or the reverse, a run folder for a checkpoint) is named."""
    if args.resume not in (None, "latest"):
        from dit_gspn.checkpoint import check_checkpoint_folder

        if args.config is None:  # with --config, the run's checkpoints are listed once its run_dir is known
            check_checkpoint_folder(args.resume)
        saved = Path(args.resume) / "config.yaml"
        if saved.is_file():
            if args.config is not None:
                print(f"note: --resume {args.resume}: its config.yaml is the base config; --config {args.config} "
                      f"is not read (put changes in key=value overrides)", file=sys.stderr, flush=True)
            return saved
    if args.config is None:
        raise MissingFileError(f"--resume {args.resume}: {Path(args.resume) / 'config.yaml'} does not exist; a "
                               f"training checkpoint holds it (or pass --config with the run's config)")
    return Path(args.config)  # read_yaml names it if it is missing or a folder


def main(argv=None) -> int:
    args = parse_args(argv)
    from dit_gspn.training import load_config, train

    config = load_config(base_config_path(args), args.overrides)
    result = train(config, resume=args.resume, allow_config_change=args.allow_config_change)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"trained to step {result.step} (loss {result.loss:.4f}); checkpoint: {result.checkpoint}"
              + (f"; samples: {result.grid}" if result.grid else ""))
    return 0


run = command(main)

if __name__ == "__main__":
    sys.exit(run())
