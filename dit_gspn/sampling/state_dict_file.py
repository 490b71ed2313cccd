"""DiT's and SiT's own ``.pt`` files: a released state dict, or their ``train.py`` checkpoints.

facebookresearch/DiT's and willisma/SiT's ``train.py`` save ``{"model", "ema", "opt", "args"}`` with ``args``
an ``argparse.Namespace``; their released models are the bare (EMA) state dict. Both load with
``weights_only=True``, allowing ``argparse.Namespace`` and nothing else beyond tensors and plain values.
The network's sizes (width, depth, patch, channels, learned sigma, classes, training grid) are read from the
state dict's shapes, so a DiT of a size outside the zoo loads too; only the head count is not in the shapes
(the zoo's for the zoo's width, else ``num_heads``). ``--model SiT-.../...`` marks the file as a SiT model:
it loads into the attention network unchanged and is wrapped in :class:`SiTVelocity`.
"""
from __future__ import annotations

import argparse
import math
import re
from pathlib import Path

import torch

from dit_gspn.checkpoint import CheckpointError, SamplingInfo, load_plain_values, state_dict_mismatch
from dit_gspn.diffusion import DiffusionObjective, FlowObjective
from dit_gspn.vae import DEFAULT_VAE, LATENT_SCALE

from .sit import SiTVelocity, is_sit_name, network_name

#: What a DiT / SiT training checkpoint holds besides tensors and plain values.
TRAINING_FILE_GLOBALS = [argparse.Namespace]
#: DiT's ``--vae`` choices -> the hub names its sample.py loads.
DIT_VAES = {"ema": "stabilityai/sd-vae-ft-ema", "mse": "stabilityai/sd-vae-ft-mse"}


def read_state_dict_file(path: Path, weights: str = "ema") -> tuple[dict, dict]:
    """(state dict, the training run's args as a dict, or {} for a bare state dict) from a DiT/SiT ``.pt``.

    ``weights`` picks ``ema`` (default, what DiT's and SiT's sample.py use) or ``model`` from a training file.
    """
    raw = load_plain_values(path, TRAINING_FILE_GLOBALS)
    args = {}
    if isinstance(raw, dict) and isinstance(raw.get(weights), dict):
        args = vars(raw["args"]) if isinstance(raw.get("args"), argparse.Namespace) else {}
        raw = raw[weights]
    elif isinstance(raw, dict) and {"ema", "model"} & set(raw):
        raise CheckpointError(f"{path} is a training checkpoint without {weights!r} weights (it holds "
                              f"{', '.join(sorted(map(str, raw)))})")
    if not isinstance(raw, dict) or not raw or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise CheckpointError(f"{path} does not hold a state dict (names -> tensors), nor DiT's training "
                              f"checkpoint ({{'model', 'ema', 'opt', 'args'}})")
    return raw, args


def network_config(state: dict, path: Path) -> dict:
    """DiT constructor arguments read from the shapes of a DiT-layout state dict (all but ``num_heads``)."""
    try:
        hidden, in_channels, patch, _ = state["x_embedder.proj.weight"].shape
        depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
        mlp_hidden = state["blocks.0.mlp.fc1.weight"].shape[0]
        out_channels = state["final_layer.linear.weight"].shape[0] // (patch * patch)
        table_rows = state["y_embedder.embedding_table.weight"].shape[0]
    except (KeyError, ValueError) as err:
        raise CheckpointError(f"{path} is not a DiT-layout state dict (x_embedder, blocks.N, final_layer, "
                              f"y_embedder): {type(err).__name__}: {err}") from err
    if out_channels not in (in_channels, 2 * in_channels):
        raise CheckpointError(f"{path}: the final layer outputs {out_channels} channels for {in_channels} inputs")
    config = dict(hidden_size=int(hidden), in_channels=int(in_channels), patch_size=int(patch), depth=depth,
                  mlp_ratio=mlp_hidden / hidden, learn_sigma=out_channels == 2 * in_channels,
                  # DiT and SiT always train with label dropout, so the table holds the null class too.
                  num_classes=int(table_rows) - 1)
    if "pos_embed" in state:
        grid = math.isqrt(state["pos_embed"].shape[1])
        config["input_size"] = grid * config["patch_size"]
    return config


def _zoo_heads(model_name: str, hidden_size: int) -> int | None:
    from dit_gspn.models import create_model

    with torch.device("meta"):  # the preset's sizes, without allocating its weights
        preset = create_model(model_name, depth=1, use_pos_embed=False)
    return preset.config.num_heads if preset.config.hidden_size == hidden_size or preset.mixer == "gspn" else None


def _check_sit_args(args: dict, path: Path) -> None:
    path_type, prediction = args.get("path_type", "Linear"), args.get("prediction", "velocity")
    if path_type != "Linear" or prediction != "velocity":
        raise CheckpointError(f"{path} is a SiT trained with path_type={path_type}, prediction={prediction}; "
                              f"only SiT's default (Linear, velocity) is our flow-matching objective")


def load_state_dict_file(path: Path, model_name: str, weights: str = "ema", image_size=None,
                         vae: str | None = None, num_heads: int | None = None):
    """(model in eval mode, SamplingInfo) from a DiT/SiT ``.pt`` file; ``model_name`` a zoo or ``SiT-`` name.

    The training size is the stored positional embedding's (else the run's ``args.image_size``, else
    ``image_size``, default 256 px); the VAE is ``vae``, else the run's ``args.vae``, else DiT's default.
    """
    from dit_gspn.models import create_model

    state, args = read_state_dict_file(path, weights)
    config = network_config(state, path)
    sit = is_sit_name(model_name)
    if sit:
        _check_sit_args(args, path)
    zoo = network_name(model_name)
    latent = config["in_channels"] == 4
    factor = 8 if latent else 1
    if "input_size" not in config:
        pixels = image_size[0] if image_size else args.get("image_size", 256)
        config["input_size"] = pixels // factor
    heads = num_heads or _zoo_heads(zoo, config["hidden_size"])
    if heads is None:
        raise CheckpointError(f"{path} has width {config['hidden_size']}, not {zoo}'s: pass --num-heads (the head "
                              f"count is not in the state dict's shapes)")
    model = create_model(zoo, num_heads=heads, **config)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(f"{path} does not load into {zoo} with {config}: "
                              f"{state_dict_mismatch(model, state)}") from err
    vae = vae or (DIT_VAES.get(args.get("vae"), DEFAULT_VAE) if latent else None)
    size = config["input_size"] * factor
    info = SamplingInfo(vae, LATENT_SCALE if vae else 1.0, (size, size), config["num_classes"],
                        objective=(FlowObjective if sit else DiffusionObjective).name)
    return (SiTVelocity(model) if sit else model).eval(), info
