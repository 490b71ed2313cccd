"""A user's feature extractor in Inception's place (``--extractor FILE``): a ``torch.export`` program (``.pt2``) or
a TorchScript file whose network maps uint8 (B, 3, H, W) images to (B, D) features, or to a pair (features,
logits) whose logits serve IS. It has no spatial features, so no sFID. Reports and statistics files name it
``<kind> <file name>`` and record the file's sha256, so that statistics of one extractor are never compared with
another's.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from dit_gspn.errors import UserError
from dit_gspn.hashing import sha256_file
from dit_gspn.module_file import EXPORTED, load_module, module_kind

from .inception import LOGITS, POOL


class ExtractorFileError(UserError, ValueError):
    """An extractor whose output is not what ``--extractor`` promises."""


class ExtractorFile:
    """uint8 (B, 3, H, W) images -> {"pool": (B, D) features, "logits": (B, K) if the network returns them}."""

    def __init__(self, path: str | os.PathLike, device: str = "cpu"):
        self.path = Path(path)
        self.net = load_module(self.path, device, what="feature extractor")
        self.sha256 = sha256_file(self.path)
        kind = "torch.export" if module_kind(self.path) == EXPORTED else "torchscript"
        self.name = f"{kind} {self.path.name}"
        self.description = str(self.path)
        self.device = device
        self._has_logits: bool | None = None

    def outputs(self, example: torch.Tensor | None) -> tuple[str, ...]:
        """``("pool", "logits")`` or ``("pool",)``, found by running the network on ``example`` images; with no
        images to run it on (statistics only), ``("pool",)``: without images no metric needs the logits."""
        if self._has_logits is None:
            if example is None:
                return (POOL,)
            self(example[:1], wanted=(POOL,))
        return (POOL, LOGITS) if self._has_logits else (POOL,)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, wanted=(POOL, LOGITS)) -> dict[str, torch.Tensor]:
        out = self.net(images.to(self.device))
        features, logits = out if isinstance(out, (tuple, list)) else (out, None)
        self._has_logits = logits is not None
        if LOGITS in wanted and logits is None:
            raise ExtractorFileError(f"{self.path} returns features only, no logits: IS needs them (pass "
                                     f"--metrics without isc)")
        if not torch.is_tensor(features) or features.ndim < 2:
            raise ExtractorFileError(f"{self.path} returned {type(features).__name__} "
                                     f"{tuple(getattr(features, 'shape', ()))}; expected (B, D) features")
        found = {POOL: features.float().flatten(1).cpu()}
        if LOGITS in wanted:
            found[LOGITS] = logits.float().flatten(1).cpu()
        return found
