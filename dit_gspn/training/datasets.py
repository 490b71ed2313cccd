"""The dataset a config asks for, what the model must look like to fit it, and how its samples become images."""
from __future__ import annotations

from dataclasses import dataclass

from torch.utils.data import Dataset

from dit_gspn.data import LatentShardDataset, ShapesDataset, read_index
from dit_gspn.sampling.checkpoint import SamplingInfo

from .config import ConfigError, RunConfig


@dataclass
class TrainingData:
    dataset: Dataset
    in_channels: int
    input_size: int | tuple[int, int]
    num_classes: int
    sampling_info: SamplingInfo


def build_training_data(config: RunConfig) -> TrainingData:
    """The dataset of ``config.data``, checked against the model settings given in ``config.model``;
    its SamplingInfo carries ``train.objective``."""
    data, model = config.data, config.model.options
    objective = config.train.objective  # how the model trained on this data is to be sampled
    if data.kind == "shapes":
        size = data.image_size
        dataset = ShapesDataset(num_per_class=data.num_per_class, image_size=size, seed=config.seed, flip=data.flip)
        info = SamplingInfo(vae=None, latent_scale=1.0, image_size=(size, size), num_classes=dataset.num_classes,
                            class_names=list(dataset.class_names), objective=objective)
        result = TrainingData(dataset, 3, size, dataset.num_classes, info)
        if model.get("num_classes") is not None and model["num_classes"] < dataset.num_classes:
            raise ConfigError(f"model.num_classes={model['num_classes']} but the shapes dataset has "
                              f"{dataset.num_classes} classes; unset it or set it to >= {dataset.num_classes}")
    else:  # latents; validate_config made sure data.path is a folder
        index = read_index(data.path)
        channels, height, width = index["latent_shape"]
        input_size = height if height == width else (height, width)
        expected = (model.get("in_channels", channels), *_pair(model.get("input_size", input_size)))
        dataset = LatentShardDataset(data.path, expected_shape=expected,
                                     num_classes=model.get("num_classes", index["num_classes"]), flip=data.flip)
        info = SamplingInfo(vae=index["vae"], latent_scale=float(index["latent_scale"]),
                            image_size=tuple(index["image_size"]), num_classes=int(index["num_classes"]),
                            class_names=index.get("class_names"), objective=objective)
        result = TrainingData(dataset, channels, input_size, int(index["num_classes"]), info)
    if model.get("in_channels") is not None and model["in_channels"] != result.in_channels:
        raise ConfigError(f"model.in_channels={model['in_channels']} but the data has {result.in_channels} channels")
    if model.get("input_size") is not None and _pair(model["input_size"]) != _pair(result.input_size):
        raise ConfigError(f"model.input_size={model['input_size']} but the data is {result.input_size} "
                          f"({'latent' if data.kind == 'latents' else 'pixel'} size)")
    if model.get("num_classes") is not None:
        # More classes than the data holds is allowed (a subset of ImageNet); fewer is caught per label.
        result.num_classes = model["num_classes"]
        result.sampling_info.num_classes = result.num_classes
        if result.sampling_info.class_names and len(result.sampling_info.class_names) != result.num_classes:
            result.sampling_info.class_names = None
    return result


def _pair(size) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
