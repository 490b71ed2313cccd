"""What a block mixes its tokens with: the token-mixer interface, and the registry of mixers by name.

A mixer is one module and one registration::

    @register_mixer("my-mixer")
    class MyMixer(TokenMixer):
        def __init__(self, dim: int, width: int = 4): ...
        def forward(self, tokens, grid): ...

and then ``create_model("GSPN-S/2", mixer="my-mixer", mixer_kwargs={"width": 8})``, or in a config
``model.mixer: my-mixer`` with ``model.mixer_kwargs: {width: 8}``. Its keyword options (``for_block``'s, by
default its constructor's) are what ``mixer_kwargs`` accepts; the config checks them as it checks its own keys.
"""
from __future__ import annotations

from typing import ClassVar, NamedTuple

import torch
import torch.nn as nn

from dit_gspn.registry import Option, Registry, keyword_options


class BlockContext(NamedTuple):
    """What a block tells the mixer it builds: the model's width and heads, and where the block sits."""

    hidden_size: int
    num_heads: int
    index: int  # 0-based block index
    depth: int  # number of blocks


class TokenMixer(nn.Module):
    """(B, N, C) tokens on their (h, w) grid -> (B, N, C) tokens: a block's token mixer."""

    #: The block attribute that holds the mixer, hence its state-dict keys ``blocks.<i>.<block_attribute>.*``.
    block_attribute: ClassVar[str] = "token_mixer"

    @classmethod
    def for_block(cls, context: BlockContext, **options) -> "TokenMixer":
        """The mixer of the block ``context`` describes, with the user's ``options`` (``mixer_kwargs``)."""
        return cls(context.hidden_size, **options)

    def reset_parameters(self) -> None:
        """Re-apply the mixer's own initialisation; the model calls it after its generic one (DiT's Xavier)."""

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        raise NotImplementedError


#: Every token mixer by name (``DiT(mixer=...)``, ``model.mixer``).
MIXERS: Registry[type[TokenMixer]] = Registry("mixer")


def register_mixer(name: str):
    """Class decorator: register a :class:`TokenMixer` subclass as ``name``."""

    def add(cls):
        if not (isinstance(cls, type) and issubclass(cls, TokenMixer)):
            raise TypeError(f"mixer {name!r} must be a TokenMixer subclass, got {cls!r}")
        return MIXERS.register(name, cls)

    return add


def mixer_options(name: str) -> dict[str, Option]:
    """The keyword options mixer ``name`` accepts in ``mixer_kwargs``: its ``for_block``'s, or where it keeps
    TokenMixer's, its constructor's after the width."""
    cls = MIXERS[name]
    if cls.for_block.__func__ is TokenMixer.for_block.__func__:
        return keyword_options(cls, skip_positional=1)
    return keyword_options(cls.for_block, skip=("context",))


def build_mixer(name: str, context: BlockContext, options: dict | None = None) -> TokenMixer:
    """Mixer ``name`` for the block ``context`` describes, with ``options``."""
    return MIXERS[name].for_block(context, **(options or {}))
