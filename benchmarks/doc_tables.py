"""The reference tables of the user docs, generated from the code: every config key with its type, default and
check, every registered sampler, and the zoo's parameter counts.

    python -m benchmarks.doc_tables config     # docs/training.md, "Config reference"
    python -m benchmarks.doc_tables samplers   # docs/sampling.md, "Samplers"
    python -m benchmarks.doc_tables zoo        # docs/architecture.md, "The model zoo" (meta device: no memory)
    python -m benchmarks.doc_tables flow-grids # docs/sampling.md, why Euler takes equal steps and Heun does not

Keys, types and defaults come from the dataclasses of ``dit_gspn/training/config.py`` and the signatures the
registries read (``keyword_options``); each check is the first line of the ``ConfigError`` that the config
raises for an out-of-range value, so it says what the code checks. Only the one-line descriptions are written
here (``WHAT``), or taken from the field's trailing comment in config.py.
"""
from __future__ import annotations

import argparse
import inspect
import re
import types
import typing
from dataclasses import MISSING, fields

import torch

from dit_gspn.diffusion import OBJECTIVES, SAMPLERS
from dit_gspn.models import MIXERS, MODEL_CLASSES, MODELS, create_model
from dit_gspn.models.mixer import mixer_options
from dit_gspn.registry import keyword_options
from dit_gspn.training.config import SECTIONS, ConfigError, DataConfig, ModelConfig, RunConfig, load_config, parse_config
from dit_gspn.training.datasets import DATASETS, dataset_options

#: One-line descriptions of keys whose field has no trailing comment (or a comment that describes no use).
WHAT = {
    "run_dir": "the run folder: checkpoints/, samples/, tensorboard/, fid/",
    "seed": "seeds the data order, the noise, label dropout and the initial weights",
    "model.name": "a zoo name (`GSPN-XL/2`, `DiT-S/4`, `GSPN-paper-B/2`, ...)",
    "data.kind": "a registered dataset kind",
    "data.num_workers": "data-loader worker processes per training process",
    "train.steps": "optimizer steps to train to (counted from 0, also after a resume)",
    "train.global_batch_size": "samples per optimizer step over all processes and accumulation steps (DiT's count)",
    "train.grad_clip": "clip the gradient norm to this; null: no clipping (DiT's)",
    "train.grad_accum_steps": "micro-batches per optimizer step",
    "train.lr": "AdamW's learning rate (DiT's: 1e-4, constant)",
    "train.weight_decay": "AdamW's weight decay",
    "train.betas": "AdamW's betas",
    "train.warmup_steps": "linear warm-up of the learning rate over this many steps",
    "train.lr_schedule": "after the warm-up: constant, or a cosine from `lr` to `min_lr`",
    "train.min_lr": "where the cosine ends",
    "train.lr_decay_steps": "the step where the cosine reaches `min_lr`; null: `train.steps`",
    "train.lr_update_every": "hold the learning rate for blocks of this many steps (an epoch's steps: a "
                             "per-epoch schedule)",
    "train.objective": "a registered training objective (`ddpm`: DiT's, `flow`: SiT's flow matching)",
    "train.objective_kwargs": "the objective's own options (next table)",
    "train.mixed_precision": "autocast of the forward pass (accelerate's)",
    "train.gradient_checkpointing": "recompute each block in the backward pass (less memory, more compute)",
    "train.ema_decay": "decay of the EMA of the weights that sampling uses",
    "checkpoint.keep_last": "checkpoints kept; older ones are removed",
    "logging.samples_per_class": "grid rows: samples per class",
    "logging.sample_classes": "class ids in the grids; null: DiT's for 1000 classes, else up to 10 spread",
    "logging.sampler": "sampler of grids and FID samples; null: the objective's default",
    "logging.sample_steps": "its steps; null: the sampler's default",
    "logging.fid_extractor": "FID features: null Inception, a feature-extractor file (.pt2 or TorchScript), or `dataset` (the dataset kind's own)",
    "logging.fid_reference": "statistics `.npz` of the data (`python -m evaluation IMAGES --save-stats REF.npz`)",
    "logging.fid_weights": "Inception weights file (else `$DIT_GSPN_INCEPTION_WEIGHTS`)",
    "repa.encoder": "a network file (.pt2 or TorchScript), a torch.hub `FOLDER:entry`, or a DINOv2 name (`dinov2_vitb14`)",
    "logging.cfg_scale": "classifier-free guidance scale of grids and FID samples; 1: none",
    "logging.tensorboard": "write `<run_dir>/tensorboard/`",
    "logging.fid_samples": "images per FID evaluation (fixed seed and classes), over all processes",
}
#: The model class's constructor arguments, by name.
MODEL_WHAT = {
    "input_size": "training size of the latent or pixel map (int or [H, W]); set from the data",
    "patch_size": "patch side; set by the zoo name's `/2`, `/4`, `/8`",
    "in_channels": "input channels; set from the data",
    "hidden_size": "token width; set by the zoo name's size",
    "depth": "blocks; set by the zoo name's size",
    "num_heads": "attention heads (attention mixer); set by the zoo name's size",
    "mlp_ratio": "MLP hidden width / token width",
    "class_dropout_prob": "label dropout to the null class (classifier-free guidance needs > 0)",
    "num_classes": "class count (also the null class id); the data's unless larger",
    "learn_sigma": "output a variance too; set by the objective (leave unset)",
    "mixer": "a registered token mixer; set by the zoo family",
    "mixer_kwargs": "the mixer's own options (tables below)",
    "use_pos_embed": "DiT's fixed sin-cos embedding; null: on for attention, off for GSPN",
    "drop_path": "stochastic depth of the last block, rising linearly from 0 over the blocks",
    "directions": "`aligned` (each direction on its own pixels) or `as_released` (the authors' code)",
    "chunk": "scan restart every `chunk` steps; null: every block global",
    "global_layers": "the last `global_layers` blocks scan globally",
    "proxy_ratio": "the proxy has C / `proxy_ratio` channels",
}
#: Where a class's argument means something else than DiT's.
MODEL_WHAT_OF = {"GSPNPaper": {
    "patch_size": "patch side; set by the zoo name's `/2`, `/4`",
    "depth": "in-blocks + out-blocks (the model has `depth + 1` blocks); set by the zoo name's size",
    "global_layers": "the last `global_layers` blocks scan globally (0: as released)",
}}
MIXER_WHAT = {
    "chunk": "scans restart every `chunk` steps (local GSPN); null: every block scans globally",
    "global_layers": "the last `global_layers` blocks scan globally; null: depth // 4",
    "proxy_ratio": "the low-rank proxy has C / `proxy_ratio` channels",
    "gate_groups": "channel groups sharing each direction's gates; null: per channel. Divides C",
    "group_lam_u": "lam, u and the merge shared by the same groups (else per channel)",
    "dwconv": "depthwise 3x3 convolution before the scan",
    "skip": "the input-dependent skip D * x",
    "output_gate": "multiply the output by SiLU(z), z a second half of the input projection",
    "directions": "`aligned` or `as_released` (the authors' directions, square grids only)",
}
MIXER_WHAT_OF = {"gspn-paper": {"global_layers": "the last `global_layers` blocks scan globally"}}
OBJECTIVE_WHAT = {
    "snr_gamma": "Min-SNR weighting of the epsilon MSE (Hang et al. 2023; 5 is theirs); null: DiT's plain MSE",
    "timestep_sampling": "noise levels drawn `uniform` or `logit_normal` (SD3's)",
    "shift": "SD3's timestep shift s' = k s / (1 + (k - 1) s); 1: none",
}
DATA_WHAT = {
    "path": "the latent folder written by `extract_latents.py`",
    "flip": "also use horizontally flipped copies (latents: extracted with them)",
    "num_per_class": "images generated per class",
    "image_size": "image side in pixels",
}
DATA_WHAT_OF = {"shapes": {"flip": "random horizontal flips"}}


#: The step counts of the samplers whose ``check_steps`` has a rule beyond a minimum.
STEP_RULES = {"ddpm": "1 to 1000 (ADM's `space_timesteps`)", "ddim": "ADM's ddimN counts (`DDIM_COUNTS`)"}


#: Checks whose error names the probed value or the default sampler: the rule in general words.
CHECK_WORDING = {"logging.sample_steps": "a step count the sampler takes (docs/sampling.md)",
                 "logging.flow_shift": "a positive number; 1 with a diffusion sampler"}


def _type(hint) -> str:
    """A type hint in a user's words, as the YAML takes it."""
    args = typing.get_args(hint)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        return " or ".join(_type(a) for a in rest) + (" or null" if type(None) in args else "")
    if origin is tuple:
        return "[H, W]"
    if origin in (list, typing.List):
        return "list"
    if origin in (dict, typing.Dict) or hint is dict:
        return "mapping"
    return {int: "int", float: "float", bool: "bool", str: "string"}.get(hint, str(hint).replace("typing.", ""))


def _value(value) -> str:
    if value is inspect.Parameter.empty:
        return "(required)"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return f"{value:,}" if isinstance(value, int) and abs(value) >= 10_000 else str(value)


def _trailing_comments(cls) -> dict[str, str]:
    """The trailing comment of each field line in ``cls``'s source."""
    comments = {}
    for line in inspect.getsource(cls).splitlines():
        match = re.match(r"\s+(\w+): [^=]+=[^#]*#\s*(.+)$", line)
        if match:
            comments[match.group(1)] = match.group(2).strip()
    return comments


def _check(key: str, hint) -> str:
    """What the config says when ``key`` is out of range: the first line of its ConfigError, from the key on."""
    base = typing.get_args(hint)[0] if type(None) in typing.get_args(hint) else hint
    if typing.get_origin(base) in (list, typing.List):
        base = list
    probe = {int: "-1000000000", float: "-1.0e30", str: "'?'", list: "[2, -1]"}.get(base)
    if probe is None:
        return ""
    try:
        parse_config(load_config(None, [f"{key}={probe}"]))
    except ConfigError as err:
        message = str(err).splitlines()[0]
        for prefix in (f"{key} must be ", f"{key}: "):
            if message.startswith(prefix):
                check = message[len(prefix):].split(", got ")[0]
                check = re.sub(r"^the [^,;]*? must be ", "", check.split("; choose ")[-1].replace("choose ", ""))
                return CHECK_WORDING.get(key, check)
        return ""
    return ""


def _table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def config_tables() -> str:
    """Every config key, section by section, then the options of each registered model class, mixer, objective
    and dataset kind."""
    out = []
    rows = []
    for key in ("run_dir", "seed"):
        hint = typing.get_type_hints(RunConfig)[key]
        rows.append([f"`{key}`", _type(hint), _value(getattr(RunConfig, key)), _check(key, hint), WHAT[key]])
    rows.append(["`model.name`", "string", _value(ModelConfig.name), "a zoo name", WHAT["model.name"]])
    rows.append(["`data.kind`", "string", _value(DataConfig.kind), "one of " + ", ".join(DATASETS), WHAT["data.kind"]])
    rows.append(["`data.num_workers`", "int", _value(DataConfig.num_workers), _check("data.num_workers", int),
                 WHAT["data.num_workers"]])
    out.append("#### Top level, `model.name`, `data.kind`\n\n" + _table(["key", "type", "default", "check", "what"],
                                                                         rows))
    for name, cls in SECTIONS.items():
        comments = _trailing_comments(cls)
        hints = typing.get_type_hints(cls)
        rows = []
        for f in fields(cls):
            key = f"{name}.{f.name}"
            default = f.default if f.default_factory is MISSING else f.default_factory()
            what = WHAT.get(key) or comments.get(f.name, "")
            rows.append([f"`{key}`", _type(hints[f.name]), _value(default), _check(key, hints[f.name]), what])
        out.append(f"#### `{name}`\n\n" + _table(["key", "type", "default", "check", "what"], rows))
    for class_name, cls in MODEL_CLASSES.items():
        families = sorted({n.rsplit("-", 1)[0] for n, e in MODELS.items() if e.model_class is cls})
        what = {**MODEL_WHAT, **MODEL_WHAT_OF.get(class_name, {})}
        rows = [[f"`model.{o.name}`", _type(o.type), _value(o.default), what.get(o.name, "")]
                for o in keyword_options(cls).values()]
        out.append(f"#### `model` for {' and '.join(f'`{f}-*`' for f in families)} (`{class_name}`)\n\n"
                   + _table(["key", "type", "class default", "what"], rows))
    for mixer in MIXERS:
        options = mixer_options(mixer)
        if not options:
            out.append(f"#### `model.mixer_kwargs` of the `{mixer}` mixer\n\nNone.")
            continue
        what = {**MIXER_WHAT, **MIXER_WHAT_OF.get(mixer, {})}
        rows = [[f"`{o.name}`", _type(o.type), _value(o.default), what.get(o.name, "")] for o in options.values()]
        out.append(f"#### `model.mixer_kwargs` of the `{mixer}` mixer\n\n" + _table(["key", "type", "default", "what"],
                                                                                    rows))
    for objective, cls in OBJECTIVES.items():
        rows = [[f"`{o.name}`", _type(o.type), _value(o.default), OBJECTIVE_WHAT.get(o.name, "")]
                for o in keyword_options(cls).values()]
        out.append(f"#### `train.objective_kwargs` of `{objective}`\n\n" + _table(["key", "type", "default", "what"],
                                                                                  rows))
    for kind in DATASETS:
        what = {**DATA_WHAT, **DATA_WHAT_OF.get(kind, {})}
        rows = [[f"`data.{o.name}`", _type(o.type), _value(o.default), what.get(o.name, "")]
                for o in dataset_options(kind).values()]
        out.append(f"#### `data` of kind `{kind}`\n\n" + _table(["key", "type", "default", "what"], rows))
    return "\n\n".join(out)


def sampler_table() -> str:
    """Every registered sampler with its objective, default steps and rules."""
    rows = []
    for name, spec in SAMPLERS.items():
        rule = STEP_RULES.get(name, f">= {spec.min_steps}")
        rows.append([f"`{name}`", f"`{spec.objective}`", str(spec.default_steps), rule,
                     "yes" if spec.stochastic else "no", "yes" if spec.shifts_timesteps else "no"])
    return _table(["sampler", "objective", "default steps", "step counts", "fresh noise each step", "takes "
                   "`--flow-shift`"], rows)


def zoo_table() -> str:
    """Parameters in millions of every zoo model at its defaults, built on the meta device."""
    counts = {}
    with torch.device("meta"):
        for name in MODELS:
            counts[name] = create_model(name).num_parameters()
    rows = []
    for name, count in counts.items():
        family, size = name.rsplit("-", 1)
        if family == "GSPN":
            twin = counts[f"DiT-{size}"]
            rows.append([size, f"{count / 1e6:.2f}", f"{twin / 1e6:.2f}", f"{count / twin:.3f}"])
    table = _table(["size", "GSPN (M)", "DiT (M)", "GSPN / DiT"], rows)
    paper = [[name.split("-", 2)[2], f"{count / 1e6:.2f}", f"{count:,}"] for name, count in counts.items()
             if name.startswith("GSPN-paper-")]
    return table + "\n\n" + _table(["GSPN-paper", "parameters (M)", "parameters"], paper)


def flow_grid_table(draws: int = 100_000, variance: float = 0.25) -> str:
    """Mean |x_N - exact| of Euler and Heun on data N(0, ``variance``) with its exact velocity, in float32, over
    the grid each sampler uses and the other one (``ode_noise_levels``): N equal steps, or diffusers' grid ending
    at ``HEUN_LAST_LEVEL``. Heun's last step, to 0, is Euler's, as in diffusers (no corrector at s = 0)."""
    from dit_gspn.diffusion.flow import HEUN_LAST_LEVEL, ode_noise_levels

    a = variance

    def velocity(x, s):  # E[noise - x_0 | x_s] for x_s = (1 - s) x_0 + s noise
        return (s - (1 - s) * a) / ((1 - s) ** 2 * a + s ** 2) * x

    x1 = torch.randn(draws, generator=torch.Generator().manual_seed(0))
    exact = a ** 0.5 * x1  # the ODE carries N(0, 1) at s = 1 onto N(0, a) at s = 0, linearly

    def error(levels, heun: bool) -> float:
        s = [float(level) for level in levels] + [0.0]
        x = x1.clone()
        for i in range(len(s) - 1):
            h, d = s[i + 1] - s[i], velocity(x, s[i])
            predicted = x + h * d
            x = x + h / 2 * (d + velocity(predicted, s[i + 1])) if heun and s[i + 1] > 0 else predicted
        return (x - exact).abs().mean().item()

    rows = []
    for n in (5, 10, 25, 50):
        equal, diffusers = ode_noise_levels(n), ode_noise_levels(n, last_level=HEUN_LAST_LEVEL)
        rows.append([str(n), f"**{error(equal, False):.2e}**", f"{error(diffusers, False):.2e}",
                     f"**{error(diffusers, True):.2e}**", f"{error(equal, True):.2e}"])
    return _table(["steps N", "`euler`, N equal steps", "`euler`, diffusers' grid", "`heun`, diffusers' grid",
                   "`heun`, N equal steps"], rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    tables = {"config": config_tables, "samplers": sampler_table, "zoo": zoo_table, "flow-grids": flow_grid_table}
    parser.add_argument("table", choices=tuple(tables))
    args = parser.parse_args(argv)
    print(tables[args.table]())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
