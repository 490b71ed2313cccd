"""What a block mixes its tokens with: the token-mixer interface, and the registry of mixers by name.

A mixer is one module and one registration::

    @register_mixer("my-mixer")
    class MyMixer(TokenMixer):
        def __init__(self, dim: int, width: int = 4): ...
        def forward(self, tokens, grid): ...

and then ``create_model("GSPN-S/2", mixer="my-mixer", mixer_kwargs={"width": 8})``, or in a config
``model.mixer: my-mixer`` with ``model.mixer_kwargs: {width: 8}``. Its keyword options (``for_block``'s, by
default its constructor's: :func:`mixer_options`) are what ``mixer_kwargs`` accepts; the config checks them as it
checks its own keys.
"""
from __future__ import annotations

import inspect
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

    def scans_locally(self, global_layers: int) -> bool:
        """Whether this block's scans restart (local): every block does but the last ``global_layers``, which scan
        the whole map. A ValueError for a negative ``global_layers``."""
        if global_layers < 0:
            raise ValueError(f"global_layers must be >= 0, got {global_layers}")
        return self.index < self.depth - global_layers


def scan_chunk(chunk) -> int | None:
    """A mixer's ``chunk`` option as the scan takes it: a positive whole number of steps, or None (the whole map).
    A ValueError naming the value otherwise."""
    if chunk is None:
        return None
    if isinstance(chunk, bool) or int(chunk) != chunk or chunk < 1:
        raise ValueError(f"chunk must be a positive number of scan steps or None (global), got {chunk!r}")
    return int(chunk)


class TokenMixer(nn.Module):
    """(B, N, C) tokens on their (h, w) grid -> (B, N, C) tokens: a block's token mixer."""

    #: The block attribute that holds the mixer, hence its state-dict keys ``blocks.<i>.<block_attribute>.*``.
    block_attribute: ClassVar[str] = "token_mixer"
    #: Whether a model with this mixer adds DiT's fixed sin-cos positional embedding by default
    #: (``DiT(use_pos_embed=None)``): a mixer that cannot tell where a token lies needs one.
    wants_pos_embed: ClassVar[bool] = False

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
    """The keyword options mixer ``name`` accepts in ``mixer_kwargs``: its ``for_block``'s named ones, then, where
    ``for_block`` passes ``**options`` on to the constructor (or is TokenMixer's), the constructor's after the
    width (``for_block``'s default wins for a name both take)."""
    cls = MIXERS[name]
    if cls.for_block.__func__ is TokenMixer.for_block.__func__:
        return keyword_options(cls, skip_positional=1)
    options = keyword_options(cls.for_block, skip=("context",))
    if any(p.kind is p.VAR_KEYWORD for p in inspect.signature(cls.for_block).parameters.values()):
        constructor = keyword_options(cls, skip_positional=1)
        options.update({key: option for key, option in constructor.items() if key not in options})
    return options
