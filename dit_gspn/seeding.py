"""Per-index random streams: one seed, or one generator, for each (seed, index..., stream) that no other shares.

``numpy.random.SeedSequence`` hashes the whole tuple, so nearby seeds or indices give unrelated streams
(``seed * K + index`` makes seed s, index K and seed s + 1, index 0 the same stream). Each use of randomness
in training and extraction names its stream (``Stream``), so two uses never draw the same numbers by accident:

    generator = index_generator(seed, rank, stream=Stream.NOISE)      # a CPU torch.Generator
    torch.manual_seed(index_seed(seed, rank, stream=Stream.LABEL_DROPOUT))

Sample i of batch sampling is ``index_seed(seed, i)`` (no stream). SeedSequence pads its input with zeros, so
a tuple equals the same tuple with trailing zeros; the stream (never 0) therefore goes last, after at least
one index, which keeps (seed, index, stream) apart from every (seed, index) and from tuples with another
number of indices.
"""
from __future__ import annotations

from enum import IntEnum

import numpy as np
import torch


class Stream(IntEnum):
    """What a stream of random numbers is for (never 0)."""

    NOISE = 1             # training: this process's timesteps and noise, per process
    LABEL_DROPOUT = 2     # training: this process's global torch RNG (classifier-free guidance's label dropout)
    DATA_ORDER = 3        # training: the shuffle of an epoch, per epoch
    LOADER = 4            # training: a DataLoader's base seed for its workers, per epoch
    LATENT_ENCODING = 5   # latent extraction: the VAE's posterior samples, per shard


def index_seed(seed: int, index: int, *more: int, stream: Stream | None = None) -> int:
    """A 63-bit seed for (seed, index, more..., stream): the ``SeedSequence`` hash of the tuple (ints >= 0)."""
    key = [int(seed), int(index), *(int(i) for i in more), *([int(stream)] if stream is not None else [])]
    low, high = np.random.SeedSequence(key).generate_state(2, dtype=np.uint32)
    return int((int(high) << 32 | int(low)) & (2**63 - 1))


def index_generator(seed: int, index: int, *more: int, stream: Stream | None = None,
                    device: torch.device | str = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with ``index_seed(seed, index, *more, stream=stream)``."""
    return torch.Generator(device).manual_seed(index_seed(seed, index, *more, stream=stream))
