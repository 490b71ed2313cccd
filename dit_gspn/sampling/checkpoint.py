"""Load a model and how to decode its samples from a training checkpoint, a save_pretrained folder or DiT's .pt.

A training checkpoint is a directory holding ``model/`` and ``ema/`` (each written by
``DiT.save_pretrained``) and ``sampling.json``::

    {"vae": null | "<AutoencoderKL hub name or local path>", "latent_scale": 0.18215 | 1.0,
     "image_size": [H, W], "num_classes": int, "class_names": [...] | null, "objective": "ddpm" | "flow"}

(``objective`` absent: "ddpm", DiT's.)
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from dit_gspn.cli import MissingFileError, UserError
from dit_gspn.diffusion import OBJECTIVES
from dit_gspn.hashing import sha256_path

SAMPLING_FILE = "sampling.json"
WEIGHT_FOLDERS = ("ema", "model")
#: The VAE DiT's own sample.py decodes with by default.
DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"
LATENT_SCALE = 0.18215


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be used: damaged, of another model, or holding more than weights and values."""


@dataclass
class SamplingInfo:
    """How a model's output becomes images: the VAE (None = pixel space), its latent scale, the image size,
    and the objective it was trained with, which decides the samplers that fit it (``check_sampler``)."""

    vae: str | None
    latent_scale: float
    image_size: tuple[int, int]
    num_classes: int
    class_names: list[str] | None = field(default=None)
    objective: str = "ddpm"

    @property
    def clip_denoised(self) -> bool:
        """Whether sampling clips predicted images to [-1, 1]: in pixel space, as ADM; never for latents."""
        return self.vae is None

    @classmethod
    def read(cls, path: str | Path) -> "SamplingInfo":
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{path} is not valid JSON: {err}") from err
        missing = [k for k in ("vae", "latent_scale", "image_size", "num_classes") if k not in raw]
        if missing:
            raise CheckpointError(f"{path} lacks the key(s) {missing}; expected vae, latent_scale, image_size, "
                             f"num_classes and class_names")
        size = raw["image_size"]
        size = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
        names = raw.get("class_names")
        if names is not None and len(names) != int(raw["num_classes"]):
            raise CheckpointError(f"{path}: class_names has {len(names)} entries but num_classes is {raw['num_classes']}")
        objective = raw.get("objective", "ddpm")
        if objective not in OBJECTIVES:
            raise CheckpointError(f"{path}: objective {objective!r} is not one of {OBJECTIVES}")
        return cls(raw["vae"], float(raw["latent_scale"]), size, int(raw["num_classes"]), names, objective)

    def write(self, path: str | Path) -> None:
        data = asdict(self)
        data["image_size"] = list(self.image_size)
        Path(path).write_text(json.dumps(data, indent=2) + "\n")


def _dit_class():
    from dit_gspn.models import DiT

    return DiT


def vae_scale_factor(vae) -> int:
    """How many pixels one latent covers along each side (8 for the Stable Diffusion VAEs)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def infer_sampling_info(model, vae: str | None = None) -> SamplingInfo:
    """A SamplingInfo for a bare model folder: 4 input channels = SD-VAE latents at 1/8 size, else pixels."""
    return _info_from_model_config(model.input_size, model.in_channels, model.num_classes, vae)


def _info_from_model_config(input_size, in_channels: int, num_classes: int, vae: str | None) -> SamplingInfo:
    height, width = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    if in_channels == 4:
        return SamplingInfo(vae or DEFAULT_VAE, LATENT_SCALE, (8 * height, 8 * width), num_classes)
    return SamplingInfo(vae, 1.0 if vae is None else LATENT_SCALE, (height, width), num_classes)


def _checkpoint_kind(ckpt: Path, weights: str, model_name: str | None) -> str:
    """``state_dict``, ``training`` or ``pretrained``, after checking that what that kind needs is there."""
    if weights not in WEIGHT_FOLDERS:
        raise CheckpointError(f"weights must be one of {WEIGHT_FOLDERS}, got {weights!r}")
    if model_name is not None:
        from dit_gspn.models import DiT_models

        from .sit import SIT_PREFIX, network_name

        if network_name(model_name) not in DiT_models:
            sit_names = [SIT_PREFIX + n[len("DiT-"):] for n in DiT_models if n.startswith("DiT-")]
            raise CheckpointError(f"--model {model_name!r} is not a zoo model; known: "
                                  f"{', '.join([*DiT_models, *sit_names])}")
        if not ckpt.is_file():
            raise MissingFileError(f"state-dict file {ckpt} does not exist (e.g. DiT's DiT-XL-2-256x256.pt)")
        return "state_dict"
    if not ckpt.exists():
        raise MissingFileError(f"checkpoint {ckpt} does not exist")
    if (ckpt / SAMPLING_FILE).is_file():
        SamplingInfo.read(ckpt / SAMPLING_FILE)  # a damaged sampling.json is named before a missing folder
        folder = ckpt / weights
        if not (folder / "config.json").is_file():
            raise MissingFileError(f"{folder} has no config.json: a training checkpoint holds model/ and ema/, "
                                   f"each written by DiT.save_pretrained")
        return "training"
    if (ckpt / "config.json").is_file():
        return "pretrained"
    if ckpt.is_file():
        raise CheckpointError(f"{ckpt} is a file: pass --model (a zoo name such as DiT-XL/2) to load it as a "
                              f"state dict")
    raise MissingFileError(f"{ckpt} holds neither {SAMPLING_FILE} (a training checkpoint) nor config.json "
                           f"(a save_pretrained folder)")


def read_checkpoint_info(ckpt: str | Path, weights: str = "ema", model_name: str | None = None,
                         image_size: tuple[int, int] | None = None, vae: str | None = None) -> SamplingInfo:
    """The SamplingInfo ``load_model`` gives for these arguments, read without loading any weights, so that
    a command can check its other arguments first. (For a state-dict file the image size is the one given and
    the class count ImageNet's: its training size and class count are only known once its shapes are read.)"""
    ckpt = Path(ckpt)
    kind = _checkpoint_kind(ckpt, weights, model_name)
    if kind == "state_dict":
        from .sit import is_sit_name

        size = image_size or (256, 256)
        return SamplingInfo(vae or DEFAULT_VAE, LATENT_SCALE, tuple(size), 1000,
                            objective="flow" if is_sit_name(model_name) else "ddpm")
    if kind == "training":
        info = SamplingInfo.read(ckpt / SAMPLING_FILE)
        if vae is not None:
            info.vae = vae
        return info
    config = _read_model_config(ckpt)
    return _info_from_model_config(config.get("input_size", 32), config.get("in_channels", 4),
                                   config.get("num_classes", 1000), vae)


def _read_model_config(folder: Path) -> dict:
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{folder / 'config.json'} is not readable JSON ({err})") from err


def _from_pretrained(folder: Path):
    """DiT.from_pretrained from safetensors only (never a pickled .bin), with a damaged folder named."""
    try:
        return _dit_class().from_pretrained(folder, use_safetensors=True)
    except (OSError, ValueError, TypeError, RuntimeError) as err:
        raise CheckpointError(f"{folder} does not hold a loadable DiT (config.json + safetensors weights): "
                              f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from err


def load_model(ckpt: str | Path, weights: str = "ema", model_name: str | None = None,
               image_size: tuple[int, int] | None = None, vae: str | None = None, num_heads: int | None = None,
               num_classes: int | None = None):
    """(model in eval mode on CPU, SamplingInfo) from any of the three checkpoint forms.

    - a training checkpoint directory (``sampling.json``, ``ema/``, ``model/``): ``weights`` picks the folder;
    - a ``save_pretrained`` folder (``config.json``): latent or pixel space inferred from its in_channels;
    - ``model_name`` (a zoo name such as ``DiT-XL/2``, or ``SiT-XL/2`` for a SiT model) with DiT's or SiT's
      ``.pt`` file: a released state dict (``DiT-XL-2-256x256.pt``) or their train.py checkpoint, whose
      ``weights`` (``ema`` by default) are taken; the sizes come from the state dict's shapes
      (``num_heads`` where the width is not the zoo's), see ``state_dict_file``.
    ``num_classes``, if given, must be the checkpoint's class count (a CheckpointError otherwise).
    ``vae`` overrides the checkpoint's VAE (a hub name or a local folder). Nothing is unpickled beyond
    tensors and plain values.
    """
    ckpt = Path(ckpt)
    kind = _checkpoint_kind(ckpt, weights, model_name)
    if kind == "state_dict":
        from .state_dict_file import load_state_dict_file

        model, info = load_state_dict_file(ckpt, model_name, weights, image_size, vae, num_heads)
    else:
        info = read_checkpoint_info(ckpt, weights, model_name, image_size, vae)
        model = _from_pretrained(ckpt / weights if kind == "training" else ckpt)
        if info.num_classes != model.num_classes:
            raise CheckpointError(f"{ckpt / SAMPLING_FILE} says num_classes={info.num_classes} but the model has "
                                  f"{model.num_classes}")
    if num_classes is not None and num_classes != info.num_classes:
        raise CheckpointError(f"{ckpt} holds a model of {info.num_classes} classes, not {num_classes}")
    return model.eval(), info


def checkpoint_sha256(ckpt: str | Path, weights: str = "ema") -> str:
    """The sha256 of what ``load_model`` reads: a ``.pt`` file, a training checkpoint's ``weights`` folder,
    or a save_pretrained folder."""
    ckpt = Path(ckpt)
    if ckpt.is_dir() and (ckpt / SAMPLING_FILE).is_file():
        return sha256_path(ckpt / weights)
    return sha256_path(ckpt)


def load_plain_values(path: Path, allowed: list = ()):
    """``torch.load(path, weights_only=True)``: tensors and plain values only (and the ``allowed`` globals),
    so a file that would run code is refused with a CheckpointError naming it."""
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as err:
        raise MissingFileError(f"{path} is missing") from err
    except Exception as err:  # UnpicklingError for a planted object; anything else is a damaged file
        lines = str(err).splitlines() or [""]
        # torch names the refused object on a later line ("... Unsupported global: GLOBAL module.name ...").
        why = next((line.strip() for line in lines if "Unsupported global" in line), lines[0])
        raise CheckpointError(f"{path} was refused: it holds more than tensors and plain values (loading a "
                              f"checkpoint never needs to run code), or it is damaged ({type(err).__name__}: "
                              f"{why})") from err


def state_dict_mismatch(model: torch.nn.Module, state: dict) -> str:
    """One line on why ``state`` does not load into ``model``: counts of missing, unexpected and
    mis-shaped keys, with the first of each."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shaped = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    parts = [f"{len(found)} {what} (e.g. {found[0]})" for what, found in
             (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shaped)) if found]
    return "; ".join(parts) or "the keys and shapes match"


def load_vae(name_or_path: str):
    """diffusers' AutoencoderKL from a local folder, or by hub name when online; an error naming both otherwise."""
    from diffusers import AutoencoderKL

    local = Path(name_or_path)
    try:
        return AutoencoderKL.from_pretrained(local if local.is_dir() else name_or_path).eval()
    except (OSError, ValueError) as err:
        raise MissingFileError(
            f"could not load the VAE {name_or_path!r}: it is not a local folder with an AutoencoderKL "
            f"(config.json + weights), and the hub could not provide it (offline? HF_HUB_OFFLINE set?). "
            f"Download it where there is network (huggingface-cli download {name_or_path} --local-dir DIR) "
            f"and pass --vae DIR. ({type(err).__name__}: {err})") from err


@torch.no_grad()
def decode(output: torch.Tensor, info: SamplingInfo, vae=None, batch_size: int = 32) -> torch.Tensor:
    """Model outputs -> images in [-1, 1]: through the VAE in batches of ``batch_size``, or as pixels."""
    if info.vae is None:
        return output.float().clamp(-1, 1)
    if vae is None:
        raise ValueError(f"these samples are latents: pass the VAE {info.vae!r} (load_vae) to decode them")
    vae_dtype = next(vae.parameters()).dtype
    images = [vae.decode(chunk.to(vae_dtype) / info.latent_scale).sample.float()
              for chunk in output.split(batch_size)]
    return torch.cat(images).clamp(-1, 1)
