"""The dataset kinds a run can train on, by name: each one builder returning what the trainer needs.

A dataset kind is one registration::

    @register_dataset("my-data")
    def my_data(*, seed: int, root: str, image_size: int = 64) -> TrainingData: ...

and a config with ``data.kind: my-data`` and ``data.root: ...`` trains on it: the builder's keyword options
(after ``seed``) are the ``data`` keys the kind accepts, checked as the config checks its own keys. The
builder checks what its options point at (a folder, a file) and raises a ``ConfigError`` naming the key.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from torch.utils.data import Dataset

from dit_gspn.checkpoint import SamplingInfo
from dit_gspn.data import LatentShardDataset, ShapesDataset, read_index
from dit_gspn.registry import Option, Registry, keyword_options
from dit_gspn.sizes import size_pair

from .config import ConfigError, RunConfig


@dataclass
class TrainingData:
    """A dataset of (image or latent (C, H, W) float tensor, class id) pairs and what the model needs to fit it:
    its channels, its size and its class count, and how samples of a model trained on it become images.
    ``fid_features``, if the kind has its own FID features (not Inception), makes them in a folder and returns
    (feature-extractor file, reference statistics file)."""

    dataset: Dataset
    in_channels: int
    input_size: int | tuple[int, int]
    num_classes: int
    sampling_info: SamplingInfo
    fid_features: Callable[[Path], tuple[Path, Path]] | None = field(default=None)


#: Every dataset kind by name (``data.kind``).
DATASETS: Registry[Callable[..., TrainingData]] = Registry("dataset kind")


def register_dataset(name: str):
    """Decorator: register a builder ``(*, seed, **options) -> TrainingData`` as dataset kind ``name``."""
    return DATASETS.register(name)


def dataset_options(kind: str) -> dict[str, Option]:
    """The ``data`` keys dataset kind ``kind`` accepts: its builder's keyword options."""
    return keyword_options(DATASETS[kind], skip=("seed",))


@register_dataset("latents")
def latent_folder(*, seed: int, path: str | None = None, flip: bool = True) -> TrainingData:
    """VAE latents pre-extracted by ``extract_latents.py`` into the folder ``path``; ``flip``: use the flipped
    copies too (DiT's random horizontal flip; they must have been extracted)."""
    if not path:
        raise ConfigError("data.path must name a latent folder (written by extract_latents.py) for "
                          "data.kind=latents")
    if not Path(path).is_dir():
        raise ConfigError(f"data.path {path} is not a folder: extract latents into it first "
                          f"(extract_latents.py --out {path})")
    index = read_index(path)
    channels, height, width = index["latent_shape"]
    info = SamplingInfo(vae=index["vae"], latent_scale=float(index["latent_scale"]),
                        image_size=tuple(index["image_size"]), num_classes=int(index["num_classes"]),
                        class_names=index.get("class_names"))
    dataset = LatentShardDataset(path, expected_shape=(channels, height, width), num_classes=info.num_classes,
                                 flip=flip)
    return TrainingData(dataset, channels, height if height == width else (height, width), info.num_classes, info)


@register_dataset("shapes")
def shapes(*, seed: int, num_per_class: int = 500, image_size: int = 32, flip: bool = True) -> TrainingData:
    """The built-in class-conditional shapes, generated from ``seed`` (``dit_gspn.data.shapes``), in pixel space:
    ``num_per_class`` images of ``image_size`` pixels per class; ``flip``: random horizontal flips."""
    if num_per_class < 1:
        raise ConfigError(f"data.num_per_class must be an integer >= 1, got {num_per_class}")
    if not 1 <= image_size <= 4096:
        raise ConfigError(f"data.image_size must be an integer in [1, 4096] (pixels), got {image_size}")
    dataset = ShapesDataset(num_per_class=num_per_class, image_size=image_size, seed=seed, flip=flip)
    info = SamplingInfo(vae=None, latent_scale=1.0, image_size=(image_size, image_size),
                        num_classes=dataset.num_classes, class_names=list(dataset.class_names))

    def fid_features(folder: Path) -> tuple[Path, Path]:  # the silhouette classifier's, not Inception's
        from .fid_monitor import shapes_reference

        return shapes_reference(folder, dataset, image_size)

    return TrainingData(dataset, 3, image_size, dataset.num_classes, info, fid_features=fid_features)


def build_training_data(config: RunConfig) -> TrainingData:
    """The dataset ``config.data`` names, checked against the model settings given in ``config.model``
    (in_channels, input_size; num_classes may exceed the data's, a subset of ImageNet), its SamplingInfo
    carrying ``train.objective``. What does not fit is a ConfigError naming the key."""
    data = DATASETS[config.data.kind](seed=config.seed, **config.data.options)
    data.sampling_info.objective = config.train.objective  # how the model trained on this data is sampled
    model = config.model.options
    if model.get("in_channels") is not None and model["in_channels"] != data.in_channels:
        raise ConfigError(f"model.in_channels={model['in_channels']} but the data has {data.in_channels} channels")
    if (model.get("input_size") is not None
            and size_pair(model["input_size"], "model.input_size", ConfigError) != size_pair(data.input_size)):
        raise ConfigError(f"model.input_size={model['input_size']} but the data is {data.input_size} (the size of "
                          f"the {config.data.kind} maps)")
    if model.get("num_classes") is not None:
        if model["num_classes"] < data.num_classes:
            raise ConfigError(f"model.num_classes={model['num_classes']} but the {config.data.kind} data has "
                              f"{data.num_classes} classes; unset it or set it to >= {data.num_classes}")
        data.num_classes = data.sampling_info.num_classes = model["num_classes"]
        if data.sampling_info.class_names and len(data.sampling_info.class_names) != data.num_classes:
            data.sampling_info.class_names = None
    return data
