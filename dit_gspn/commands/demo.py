"""The built-in demo (`make demo`): train a small GSPN-DiT on CPU, write a checkpoint and a labelled grid.

No network, no GPU, no VAE: it trains in pixel space on the seeded shapes dataset
(``dit_gspn.data.shapes``) with ``configs/demo.yaml``, then prints where everything went.

    dit-gspn-demo                       # about 5 minutes on 2 CPU cores; training stops at 1,500 steps or 4 min
    dit-gspn-demo train.steps=1000      # any train.py override
"""
from __future__ import annotations

import os
import shlex
import sys
import time
from pathlib import Path

# Idle OpenMP threads spin 10k times before they sleep (set before torch loads libgomp). On 2 cores,
# the demo model's step, measured one setting after another (ms/step alone / beside a second busy process):
# libgomp's default 169 / over 2,400; this 173 / 850; OMP_WAIT_POLICY=PASSIVE 269 / 360.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

# noqa: E402 below: imported after the OpenMP setting.
from dit_gspn.cli import ArgumentParser, command  # noqa: E402
from dit_gspn.resources import CONFIGS  # noqa: E402

DEMO_CONFIG = CONFIGS / "demo.yaml"


def main(argv=None) -> int:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--config", default=str(DEMO_CONFIG), help="the demo's config (default: configs/demo.yaml)")
    parser.add_argument("--out", default=None, help="run folder (default: runs/demo/<date-time>)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    from dit_gspn.training import load_config, train
    from dit_gspn.training.resume import check_fresh_run_folder, resume_command

    config = load_config(args.config, args.overrides)
    limit_minutes = config["train"].get("time_limit_minutes")
    limit = f" or {float(limit_minutes):g} minutes, whichever comes first," if limit_minutes else ""
    config["run_dir"] = args.out or str(Path(config["run_dir"]) / time.strftime("%Y%m%d-%H%M%S"))
    # The demo has no --resume: a folder with a run in it is refused with the train.py command that continues it.
    check_fresh_run_folder(Path(config["run_dir"]), "--out", train_longer=True)
    print(f"GSPN-DiT demo: training {config['model']['name']} (hidden {config['model'].get('hidden_size')}, "
          f"depth {config['model'].get('depth')}) for {config['train']['steps']} steps"
          f"{limit} on the built-in shapes dataset ({config['train']['objective']} objective, pixel space, "
          f"CPU). The first run also compiles the CPU scan kernel.", flush=True)
    result = train(config)
    minutes = (time.perf_counter() - start) / 60
    run = Path(result.run_dir)
    print(f"\ndone in {minutes:.1f} min (final loss {result.loss:.4f}):\n"
          f"  checkpoint:    {result.checkpoint}\n"
          f"  sample grid:   {result.grid}\n"
          f"  tensorboard:   tensorboard --logdir {run / 'tensorboard'}\n"
          f"  sample more:   python sample.py --ckpt {shlex.quote(str(result.checkpoint))} --out "
          f"{shlex.quote(str(run / 'more.png'))}\n"
          f"  train longer:  {resume_command(result.checkpoint, 2 * result.step, lift_time_limit=True)}")
    return 0


run = command(main)

if __name__ == "__main__":
    sys.exit(run())
