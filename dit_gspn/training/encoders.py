"""Frozen image encoders for representation alignment: loaded from a local file or folder, or by torch.hub name.

Every encoder is wrapped as an ``nn.Module`` that maps images in [-1, 1], (B, 3, H, W), to a feature map
(B, D, h', w'), is in eval mode and has no trainable parameters. What a spec may be:

- a network file, a ``torch.export`` program (``.pt2``, ``dit_gspn.module_file.save_exported``) or a
  TorchScript file, whose network maps images in [-1, 1] to (B, D, h', w') or to square patch tokens
  (B, h' * w', D) (the demo's silhouette classifier's conv features are saved as a ``.pt2``);
- a torch.hub folder (one with a ``hubconf.py``, e.g. a clone of facebookresearch/dinov2) and an entry point,
  ``FOLDER:dinov2_vitb14``;
- a DINOv2 entry point by name (``dinov2_vitb14``, REPA's encoder; ``dinov2_vits14``, ...), taken from
  torch.hub's cache (``torch.hub.get_dir()``) or downloaded there when online.

timm and transformers are not installed in this project's environment, so their names are refused with a
message saying so.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from dit_gspn.errors import MissingFileError, UserError
from dit_gspn.module_file import ModuleFileError, load_module

DINOV2_REPO = "facebookresearch/dinov2"
#: ImageNet's channel statistics, which DINOv2 expects its inputs normalised with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class EncoderError(UserError, ValueError):
    """An encoder spec that names nothing loadable, or an encoder whose output is not a feature map."""


def tokens_to_map(tokens: torch.Tensor, where: str) -> torch.Tensor:
    """(B, N, D) square patch tokens (row-major) -> (B, D, sqrt N, sqrt N); a 4-d map passes through."""
    if tokens.ndim == 4:
        return tokens
    if tokens.ndim != 3:
        raise EncoderError(f"{where} returned a tensor of shape {tuple(tokens.shape)}; expected a feature map "
                           f"(B, D, h, w) or patch tokens (B, N, D)")
    side = math.isqrt(tokens.shape[1])
    if side * side != tokens.shape[1]:
        raise EncoderError(f"{where} returned {tokens.shape[1]} patch tokens, not a square grid; return a "
                           f"(B, D, h, w) map instead")
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], side, side)


class FeatureMap(nn.Module):
    """A module returning a map or square tokens, as a frozen encoder of images in [-1, 1] -> (B, D, h', w')."""

    def __init__(self, net: nn.Module, name: str):
        super().__init__()
        self.net, self.name = net, name

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return tokens_to_map(self.net(images), f"the encoder {self.name}")


class Dinov2Features(nn.Module):
    """A DINOv2 ViT as REPA uses it: images resized (bicubic) to 224 per 256 pixels, ImageNet-normalised, and
    the normalised patch tokens as a (B, D, h', w') map."""

    def __init__(self, net: nn.Module, name: str):
        super().__init__()
        self.net, self.name = net, name
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        patch = int(getattr(self.net, "patch_size", 14))
        size = [max(patch, round(s * 224 / 256 / patch) * patch) for s in images.shape[-2:]]
        x = F.interpolate((images + 1) / 2, size=size, mode="bicubic", align_corners=False)
        tokens = self.net.forward_features((x - self.mean) / self.std)["x_norm_patchtokens"]
        h, w = size[0] // patch, size[1] // patch
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w)


def freeze(encoder: nn.Module) -> nn.Module:
    """``encoder`` in eval mode with every parameter's requires_grad off."""
    encoder.eval()
    for p in encoder.parameters():
        p.requires_grad_(False)
    return encoder


def _hub_load(repo: str, entry: str, source: str) -> nn.Module:
    try:
        return torch.hub.load(repo, entry, source=source, trust_repo=True, verbose=False)
    except (OSError, RuntimeError, ValueError, ImportError) as err:  # URLError is an OSError
        raise MissingFileError(
            f"could not load the encoder {entry!r} from torch.hub {repo!r} ({type(err).__name__}: {err}). "
            f"Offline, fetch it where there is network (python -c \"import torch; torch.hub.load('{repo}', "
            f"'{entry}')\") and copy {torch.hub.get_dir()} here (or clone {repo} and pass repa.encoder="
            f"FOLDER:{entry}), or pass a network file (.pt2 or TorchScript)") from err


def load_encoder(spec: str) -> nn.Module:
    """The frozen encoder ``spec`` names (see the module docstring), on the CPU, in eval mode."""
    if not isinstance(spec, str) or not spec:
        raise EncoderError(f"repa.encoder must name an encoder (a .pt2 or TorchScript file, FOLDER:entry or a "
                           f"DINOv2 name such as dinov2_vitb14), got {spec!r}")
    for prefix, package in (("timm:", "timm"), ("hf:", "transformers")):
        if spec.startswith(prefix):
            raise EncoderError(f"repa.encoder={spec!r} needs {package}, which this environment does not have; "
                               f"use a DINOv2 torch.hub name (dinov2_vitb14) or a .pt2 / TorchScript file")
    path = Path(spec)
    if path.is_file():
        try:
            net = load_module(path, "cpu", what="repa.encoder")
        except ModuleFileError as err:
            raise EncoderError(str(err)) from err
        return freeze(FeatureMap(net, str(path)))
    folder, _, entry = spec.rpartition(":")
    if folder and Path(folder).is_dir():
        net = _hub_load(folder, entry, "local")
        wrap = Dinov2Features if entry.startswith("dinov2") else FeatureMap
        return freeze(wrap(net, spec))
    if spec.startswith("dinov2_"):
        return freeze(Dinov2Features(_hub_load(DINOV2_REPO, spec, "github"), spec))
    raise EncoderError(f"repa.encoder={spec!r} is neither a file, nor FOLDER:entry with an existing folder, nor a "
                       f"DINOv2 name (dinov2_vits14, dinov2_vitb14, dinov2_vitl14, dinov2_vitg14)")
