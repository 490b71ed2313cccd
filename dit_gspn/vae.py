"""The VAE between images and latents: diffusers' ``AutoencoderKL``, loaded by hub name or from a folder.

Latents are the posterior's samples times ``LATENT_SCALE`` (0.18215, Stable Diffusion's and DiT's), so
that they have about unit variance; ``decode`` divides it out again. ``extract_latents`` encodes with
``encode``; training's sample grids, ``sample.py`` and batch sampling decode with ``decode``.
"""
from __future__ import annotations

from pathlib import Path

import torch

from dit_gspn.errors import MissingFileError

#: The VAE DiT's own sample.py decodes with by default.
DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"
#: What the SD VAEs' latents are multiplied by (DiT's ``0.18215``).
LATENT_SCALE = 0.18215


def load_vae(name_or_path: str, device: torch.device | str = "cpu"):
    """diffusers' AutoencoderKL from a local folder, or by hub name when online, frozen in eval mode on
    ``device``; a ``MissingFileError`` that says what to download and where to point ``--vae`` otherwise."""
    from diffusers import AutoencoderKL

    local = Path(name_or_path)
    try:
        vae = AutoencoderKL.from_pretrained(local if local.is_dir() else name_or_path)
    except (OSError, ValueError) as err:
        raise MissingFileError(
            f"could not load the VAE {name_or_path!r}: it is not a local folder with an AutoencoderKL "
            f"(config.json + weights), and the hub could not provide it (offline? HF_HUB_OFFLINE set?). "
            f"Download it where there is network (huggingface-cli download {name_or_path} --local-dir DIR) "
            f"and pass --vae DIR. ({type(err).__name__}: {err})") from err
    return vae.to(device).requires_grad_(False).eval()


def vae_scale_factor(vae) -> int:
    """How many pixels one latent covers along each side (8 for the Stable Diffusion VAEs)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


@torch.no_grad()
def encode(vae, images: torch.Tensor, generator: torch.Generator | None = None,
           latent_scale: float = LATENT_SCALE) -> torch.Tensor:
    """Images in [-1, 1] (B, 3, H, W) -> latents: a sample of the posterior (as DiT's extraction draws it, not
    its mean), with ``generator``, times ``latent_scale``."""
    return vae.encode(images).latent_dist.sample(generator=generator) * latent_scale


@torch.no_grad()
def decode(output: torch.Tensor, info, vae=None, batch_size: int = 32) -> torch.Tensor:
    """A model's outputs -> images in [-1, 1], as ``info`` (a ``SamplingInfo``: its ``vae`` and
    ``latent_scale``) says: latents divided by the scale and through ``vae`` in batches of ``batch_size``;
    pixels (``info.vae`` None) only clamped."""
    if info.vae is None:
        return output.float().clamp(-1, 1)
    if vae is None:
        raise ValueError(f"these samples are latents: pass the VAE {info.vae!r} (load_vae) to decode them")
    vae_dtype = next(vae.parameters()).dtype
    images = [vae.decode(chunk.to(vae_dtype) / info.latent_scale).sample.float()
              for chunk in output.split(batch_size)]
    return torch.cat(images).clamp(-1, 1)
