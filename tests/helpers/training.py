"""A training run small enough for a test: its config, written to a YAML file, and accelerate's process-wide
state put back between runs in one process."""
from pathlib import Path

import yaml


def tiny_config(run_dir, **sections) -> dict:
    """A GSPN-DiT small enough to take a step in well under a second on one core, on 16x16 shapes."""
    config = {
        "run_dir": str(run_dir), "seed": 3,
        "model": {"name": "GSPN-S/4", "hidden_size": 32, "depth": 2, "num_heads": 2},
        "data": {"kind": "shapes", "num_per_class": 6, "image_size": 16, "flip": True, "num_workers": 0},
        "train": {"steps": 6, "global_batch_size": 8, "grad_accum_steps": 2, "lr": 1e-3, "warmup_steps": 3,
                  "grad_clip": 1.0, "ema_decay": 0.9, "cpu": True},
        "checkpoint": {"every": 2, "keep_last": 2},
        "logging": {"every": 1, "tensorboard": False, "sample_every": 0, "sample_steps": 4,
                    "sample_classes": [0, 2]},
    }
    for name, values in sections.items():
        other_kind = name == "data" and values.get("kind", "shapes") != "shapes"  # the shapes' options do not apply
        config[name] = {**config[name], **values} if isinstance(config[name], dict) and not other_kind else values
    return config


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def reset_accelerate() -> None:
    """Forget accelerate's process-wide state, so that the next run in this process starts as a fresh one."""
    from accelerate.state import AcceleratorState, PartialState

    AcceleratorState._reset_state(True)
    PartialState._reset_state()


#: Overrides that make the demo command a toy run: one block, two training steps, one labelled sample a class.
TOY_DEMO = ["model.hidden_size=32", "model.depth=1", "model.num_heads=2", "data.num_per_class=4",
            "train.global_batch_size=8", "train.steps=2", "logging.sample_steps=2", "logging.samples_per_class=1"]
