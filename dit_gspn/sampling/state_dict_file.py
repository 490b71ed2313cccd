"""Other projects' ``.pt`` files: DiT's and SiT's (a released state dict, or their ``train.py`` checkpoints) and the
GSPN authors' (their ``train.py`` checkpoints of ``generation/gspn.py``'s network).

DiT's, SiT's and the GSPN authors' ``train.py`` save ``{"model", "ema", "opt", "args"}`` with ``args`` an
``argparse.Namespace``; DiT's released models are the bare (EMA) state dict. All load with ``weights_only=True``,
allowing ``argparse.Namespace`` and nothing else beyond tensors and plain values. The network's sizes (width,
depth, patch, channels, learned sigma, classes, training grid) are read from the state dict's shapes by the
layout of the ``--model`` name's class (:data:`STATE_DICT_LAYOUTS`), so a network of a size outside the zoo loads
too. DiT's layout: only the head count is not in the shapes (the zoo's for the zoo's width, else ``num_heads``);
``--model SiT-.../...`` marks the file as a SiT model: it loads into the attention network unchanged and is
wrapped in :class:`SiTVelocity`. The GSPN authors' layout (``--model GSPN-paper-...``): their keys, 1x1 conv
kernels and direction order become :class:`dit_gspn.models.gspn_paper.GSPNPaper`'s, built in the mode their
weights were trained in (``gspn_paper.AS_RELEASED``).
"""
from __future__ import annotations

import argparse
import math
import re
from pathlib import Path
from typing import Callable

import torch

from dit_gspn.checkpoint import CheckpointError, SamplingInfo, load_plain_values, state_dict_mismatch
from dit_gspn.diffusion import DiffusionObjective, FlowObjective
from dit_gspn.registry import Registry
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
        raise CheckpointError(f"{path} does not hold a state dict (names -> tensors), nor a train.py "
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


def _dit_layout(state: dict, path: Path, zoo: str, num_heads: int | None) -> tuple[dict, dict]:
    config = network_config(state, path)
    heads = num_heads or _zoo_heads(zoo, config["hidden_size"])
    if heads is None:
        raise CheckpointError(f"{path} has width {config['hidden_size']}, not {zoo}'s: pass --num-heads (the head "
                              f"count is not in the state dict's shapes)")
    return {**config, "num_heads": heads}, state


def _gspn_paper_layout(state: dict, path: Path, zoo: str, num_heads: int | None) -> tuple[dict, dict]:
    from dit_gspn.models.gspn_paper import authors_config, from_authors_state_dict

    if num_heads is not None:
        raise CheckpointError(f"--num-heads {num_heads}: {zoo} has no attention heads (leave it out)")
    try:
        return authors_config(state), from_authors_state_dict(state)
    except ValueError as err:
        raise CheckpointError(f"{path} is not a checkpoint of the GSPN authors' network for {zoo}: {err}") from err


#: How a ``.pt`` file is read for each model class (by class name, as ``MODEL_CLASSES``): ``(state dict, path,
#: zoo name, num_heads) -> (constructor arguments read from the shapes, the state dict in the class's keys)``.
STATE_DICT_LAYOUTS: Registry[Callable[[dict, Path, str, int | None], tuple[dict, dict]]] = Registry("state-dict layout")
STATE_DICT_LAYOUTS.register("DiT", _dit_layout)
STATE_DICT_LAYOUTS.register("GSPNPaper", _gspn_paper_layout)


def _check_sit_args(args: dict, path: Path) -> None:
    path_type, prediction = args.get("path_type", "Linear"), args.get("prediction", "velocity")
    if path_type != "Linear" or prediction != "velocity":
        raise CheckpointError(f"{path} is a SiT trained with path_type={path_type}, prediction={prediction}; "
                              f"only SiT's default (Linear, velocity) is our flow-matching objective")


def load_state_dict_file(path: Path, model_name: str, weights: str = "ema", image_size=None,
                         vae: str | None = None, num_heads: int | None = None):
    """(model in eval mode, SamplingInfo) from a ``.pt`` file; ``model_name`` a zoo or ``SiT-`` name whose class's
    layout (:data:`STATE_DICT_LAYOUTS`) reads it.

    The training size is the stored positional embedding's (else the run's ``args.image_size``, else
    ``image_size``, default 256 px); the VAE is ``vae``, else the run's ``args.vae``, else DiT's default.
    """
    from dit_gspn.models import MODELS, create_model

    state, args = read_state_dict_file(path, weights)
    sit = is_sit_name(model_name)
    if sit:
        _check_sit_args(args, path)
    zoo = network_name(model_name)
    layout = STATE_DICT_LAYOUTS[MODELS[zoo].model_class.__name__]
    config, state = layout(state, path, zoo, num_heads)
    latent = config["in_channels"] == 4
    factor = 8 if latent else 1
    if "input_size" not in config:
        pixels = image_size[0] if image_size else args.get("image_size", 256)
        config["input_size"] = pixels // factor
    model = create_model(zoo, **config)
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
