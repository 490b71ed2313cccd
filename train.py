"""Train a class-conditional GSPN-DiT (or DiT) from a YAML config, on one device or many.

    python train.py --config configs/demo.yaml                         # one device (CPU or GPU)
    accelerate launch --multi_gpu --num_processes 8 train.py --config configs/gspn_xl2_256.yaml
    python train.py --config configs/demo.yaml train.steps=2000 run_dir=runs/longer   # overrides
    python train.py --config configs/demo.yaml --resume                # continue the newest checkpoint
    python train.py --config configs/demo.yaml --resume runs/demo/checkpoints/0000200
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from dit_gspn.cli import ArgumentParser, run_main


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True, help="YAML file (see configs/)")
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
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from dit_gspn.training import load_config, train

    config = load_config(args.config, args.overrides)
    result = train(config, resume=args.resume, allow_config_change=args.allow_config_change)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"trained to step {result.step} (loss {result.loss:.4f}); checkpoint: {result.checkpoint}"
              + (f"; samples: {result.grid}" if result.grid else ""))
    return 0


if __name__ == "__main__":
    code = run_main(main)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # gloo workers can abort at interpreter exit even after destroy_process_group; leave at once.
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
