"""The model zoo: every named configuration (``GSPN-XL/2``, ``DiT-S/8``, ...) and the model classes by name.

A family of models is one registration::

    register_family("DiT", DiT, SIZES, PATCHES, mixer="attention")

registers ``DiT-S/2`` ... ``DiT-XL/8``: the class built with the size's arguments, the patch size and the
family's preset, any of which ``create_model(name, **overrides)`` overrides. ``MODEL_CLASSES`` holds each
family's class by its name, which is how a ``save_pretrained`` folder (its config.json's ``_class_name``)
finds the class that reads it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn as nn

from dit_gspn.registry import Registry

from .dit import DiT

#: DiT's sizes: (depth, hidden_size, num_heads) by size name.
SIZES = {"XL": dict(depth=28, hidden_size=1152, num_heads=16), "L": dict(depth=24, hidden_size=1024, num_heads=16),
         "B": dict(depth=12, hidden_size=768, num_heads=12), "S": dict(depth=12, hidden_size=384, num_heads=6)}
PATCHES = (2, 4, 8)

@dataclass(frozen=True)
class ZooEntry:
    """A named configuration: its class and the constructor arguments that make it what its name says."""

    model_class: type[nn.Module]
    preset: dict = field(default_factory=dict)

    def __call__(self, **overrides) -> nn.Module:
        return self.model_class(**{**self.preset, **overrides})


#: Every zoo model by name.
MODELS: Registry[ZooEntry] = Registry("zoo model")
#: The class of every family by its class name (a save_pretrained folder's ``_class_name``).
MODEL_CLASSES: Registry[type[nn.Module]] = Registry("model class")


def register_family(prefix: str, model_class: type[nn.Module], sizes: dict[str, dict], patches=PATCHES,
                    **preset) -> list[str]:
    """Register ``{prefix}-{size}/{patch}`` for every size and patch size: ``model_class(**size arguments,
    patch_size=patch, **preset, **overrides)``. Returns the names registered."""
    MODEL_CLASSES.register(model_class.__name__, model_class)
    names = []
    for size, arguments in sizes.items():
        for patch in patches:
            name = f"{prefix}-{size}/{patch}"
            MODELS.register(name, ZooEntry(model_class, {**arguments, "patch_size": patch, **preset}))
            names.append(name)
    return names


def create_model(name: str, **overrides) -> nn.Module:
    """Build the zoo model ``name`` (e.g. "GSPN-XL/2"), with any of its class's constructor arguments overridden.
    An unknown name raises an ``UnknownNameError`` naming the close ones."""
    return MODELS[name](**overrides)


register_family("GSPN", DiT, SIZES, mixer="gspn")
register_family("DiT", DiT, SIZES, mixer="attention")

from . import gspn_paper  # noqa: E402,F401 (a family in its own module: GSPN-paper-S/2 ... GSPN-paper-XL/4)
