"""Load a model to sample, with how its samples become images, from any of three forms: a training checkpoint
(``dit_gspn.checkpoint``), a ``save_pretrained`` folder, or DiT's / SiT's / the GSPN authors' ``.pt``
(``state_dict_file``).
"""
from __future__ import annotations

import json
from pathlib import Path

from dit_gspn.checkpoint import SAMPLING_FILE, WEIGHT_FOLDERS, CheckpointError, SamplingInfo, is_training_checkpoint
from dit_gspn.errors import MissingFileError
from dit_gspn.diffusion import DiffusionObjective, FlowObjective
from dit_gspn.hashing import sha256_path
from dit_gspn.sizes import size_pair
from dit_gspn.vae import DEFAULT_VAE, LATENT_SCALE


def _model_class(folder: Path):
    """The class a save_pretrained folder was written by (its config.json's ``_class_name``; DiT if absent)."""
    from dit_gspn.models import MODEL_CLASSES

    name = _read_model_config(folder).get("_class_name", "DiT")
    if name not in MODEL_CLASSES:
        raise CheckpointError(f"{folder / 'config.json'}: _class_name {name!r} is not a model class of this "
                              f"project; known: {', '.join(MODEL_CLASSES)}")
    return MODEL_CLASSES[name]


def infer_sampling_info(model, vae: str | None = None) -> SamplingInfo:
    """A SamplingInfo for a bare model folder: 4 input channels = SD-VAE latents at 1/8 size, else pixels."""
    return _info_from_model_config(model.input_size, model.in_channels, model.num_classes, vae)


def _info_from_model_config(input_size, in_channels: int, num_classes: int, vae: str | None) -> SamplingInfo:
    height, width = size_pair(input_size, "the model's input_size", CheckpointError)
    if in_channels == 4:
        return SamplingInfo(vae or DEFAULT_VAE, LATENT_SCALE, (8 * height, 8 * width), num_classes)
    return SamplingInfo(vae, 1.0 if vae is None else LATENT_SCALE, (height, width), num_classes)


def _checkpoint_kind(ckpt: Path, weights: str, model_name: str | None) -> str:
    """``state_dict``, ``training`` or ``pretrained``, after checking that what that kind needs is there."""
    if weights not in WEIGHT_FOLDERS:
        raise CheckpointError(f"weights must be one of {WEIGHT_FOLDERS}, got {weights!r}")
    if model_name is not None:
        from dit_gspn.models import MODELS

        from .sit import SIT_PREFIX, network_name

        if network_name(model_name) not in MODELS:
            sit_names = [SIT_PREFIX + n[len("DiT-"):] for n in MODELS if n.startswith("DiT-")]
            raise CheckpointError(f"--model {model_name!r} is not a zoo model; known: "
                                  f"{', '.join([*MODELS, *sit_names])}")
        if ckpt.is_dir():
            raise CheckpointError(f"--model {model_name} reads a state-dict .pt file, but {ckpt} is a folder: leave "
                                  f"out --model to sample a training checkpoint or a save_pretrained folder")
        if not ckpt.is_file():
            raise MissingFileError(f"state-dict file {ckpt} does not exist (e.g. DiT's DiT-XL-2-256x256.pt)")
        return "state_dict"
    if not ckpt.exists():
        raise MissingFileError(f"checkpoint {ckpt} does not exist")
    if is_training_checkpoint(ckpt):
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
                            objective=(FlowObjective if is_sit_name(model_name) else DiffusionObjective).name)
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
    """The model class's from_pretrained from safetensors only (never a pickled .bin), with a damaged folder
    named."""
    model_class = _model_class(folder)
    try:
        return model_class.from_pretrained(folder, use_safetensors=True)
    except (OSError, ValueError, TypeError, RuntimeError) as err:
        raise CheckpointError(f"{folder} does not hold a loadable {model_class.__name__} (config.json + "
                              f"safetensors weights): "
                              f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from err


def load_model(ckpt: str | Path, weights: str = "ema", model_name: str | None = None,
               image_size: tuple[int, int] | None = None, vae: str | None = None, num_heads: int | None = None,
               num_classes: int | None = None):
    """(model in eval mode on CPU, SamplingInfo) from any of the three checkpoint forms.

    - a training checkpoint directory (``sampling.json``, ``ema/``, ``model/``): ``weights`` picks the folder;
    - a ``save_pretrained`` folder (``config.json``): latent or pixel space inferred from its in_channels;
    - ``model_name`` (a zoo name such as ``DiT-XL/2``, ``SiT-XL/2`` for a SiT model, ``GSPN-paper-XL/2`` for the
      GSPN authors' network) with that project's ``.pt`` file: a released state dict (``DiT-XL-2-256x256.pt``)
      or their train.py checkpoint, whose ``weights`` (``ema`` by default) are taken; the sizes come from the
      state dict's shapes (``num_heads`` where a DiT's width is not the zoo's), see ``state_dict_file``.
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
    if ckpt.is_dir() and is_training_checkpoint(ckpt):
        return sha256_path(ckpt / weights)
    return sha256_path(ckpt)
