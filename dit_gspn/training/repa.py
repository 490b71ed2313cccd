"""Representation alignment (REPA, Yu et al., ICLR 2025): one block's hidden tokens, through a small MLP
projector, pulled towards a frozen encoder's patch features of the clean image.

loss = coefficient * mean over tokens of -cos(projector(h_k), f), with h_k the tokens block k outputs (B, h w, C)
and f the encoder's (B, D, h', w') feature map resized bilinearly to the model's token grid (h, w), which
GSPN can run at any size. The encoder runs once per batch under no_grad (bf16 autocast on a GPU) and is
never trained; the projector is trained with the model, saved in its training checkpoints (for an exact
resume), and not part of the sampling model.

Latent-space data: the encoder needs the clean images, so the latents are decoded by the data's VAE
(``clean_images``); in pixel space the batch is the clean image.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F

from dit_gspn.checkpoint import SamplingInfo
from dit_gspn.vae import decode, load_vae

#: The folder of a training checkpoint that holds the projector's weights (``model.safetensors``).
PROJECTOR_DIR = "repa_projector"


def build_projector(hidden_size: int, projector_dim: int, feature_dim: int) -> nn.Sequential:
    """REPA's projector: Linear(hidden_size, projector_dim), SiLU, Linear(projector_dim, projector_dim), SiLU,
    Linear(projector_dim, feature_dim)."""
    return nn.Sequential(nn.Linear(hidden_size, projector_dim), nn.SiLU(),
                         nn.Linear(projector_dim, projector_dim), nn.SiLU(),
                         nn.Linear(projector_dim, feature_dim))


def features_on_grid(features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, D, h', w') encoder features -> (B, h * w, D) tokens on the model's grid (bilinear resize when the
    sizes differ), in the patch tokens' row-major order."""
    if tuple(features.shape[-2:]) != tuple(grid):
        features = F.interpolate(features, size=tuple(grid), mode="bilinear", align_corners=False)
    return features.flatten(2).transpose(1, 2)


def alignment_loss(projected: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The mean over batch and tokens of the negative cosine similarity of (B, N, D) ``projected`` and
    ``target``: -1 when every token points the target's way."""
    if projected.shape != target.shape:
        raise ValueError(f"REPA: projected tokens {tuple(projected.shape)} and encoder features "
                         f"{tuple(target.shape)} differ in shape")
    return -(F.normalize(projected, dim=-1) * F.normalize(target, dim=-1)).sum(-1).mean()


class BlockTokens:
    """Keeps the tokens a module (a DiT block) outputs at each forward, for the loss to take once."""

    def __init__(self, block: nn.Module):
        self.tokens = None
        self.handle = block.register_forward_hook(self._keep)

    def _keep(self, module, inputs, output):
        # A pre-norm block (the GSPN authors') returns (its output, the residual stream): their sum is the stream
        # the next block reads.
        self.tokens = output[0] + output[1] if isinstance(output, tuple) else output

    def take(self) -> torch.Tensor:
        tokens, self.tokens = self.tokens, None
        if tokens is None:
            raise RuntimeError("REPA: the aligned block did not run since the last loss")
        return tokens

    def remove(self) -> None:
        self.handle.remove()


class RepresentationAlignment:
    """The REPA term of one training run: the frozen encoder, the hook on block ``block`` (1-based: the
    output of the first ``block`` blocks) of ``model``, and the trainable ``projector``."""

    def __init__(self, model: nn.Module, encoder: nn.Module, *, block: int, coefficient: float,
                 projector_dim: int, info: SamplingInfo, device: torch.device | str = "cpu"):
        depth = len(model.blocks)
        if not 1 <= block <= depth:
            raise ValueError(f"repa.block={block} must lie in [1, {depth}], the model's depth")
        self.device = torch.device(device)
        self.encoder = encoder.to(self.device)
        self.coefficient = float(coefficient)
        self.info = info
        self._vae = None
        self.tokens = BlockTokens(model.blocks[block - 1])
        self.patch_size = int(model.patch_size)
        size = info.image_size
        feature_dim = self._encode(torch.zeros(1, 3, *size, device=self.device)).shape[1]
        self.projector = build_projector(model.x_embedder.proj.out_channels, int(projector_dim), feature_dim)

    @torch.no_grad()
    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else nullcontext())
        with autocast:
            return self.encoder(images).float()

    @torch.no_grad()
    def clean_images(self, x: torch.Tensor) -> torch.Tensor:
        """The batch's clean images in [-1, 1]: ``x`` itself in pixel space, the VAE's decoding of latents."""
        if self.info.vae is None:
            return x
        if self._vae is None:
            self._vae = load_vae(self.info.vae).to(self.device)
        return decode(x, self.info, self._vae)

    def targets(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder's features of the clean images behind batch ``x``, as (B, h * w, D) tokens on the model's
        token grid for ``x``."""
        grid = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        return features_on_grid(self._encode(self.clean_images(x)), grid)

    def loss(self, projector: nn.Module, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(coefficient x alignment loss, alignment loss) of the tokens the hooked block output in the last
        forward; ``projector`` is ``self.projector`` or its distributed wrapper."""
        alignment = alignment_loss(projector(self.tokens.take()), targets)
        return self.coefficient * alignment, alignment.detach()
