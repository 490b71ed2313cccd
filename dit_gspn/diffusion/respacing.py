"""ADM's respacing: which of the 1000 training timesteps a sampler with N steps visits.

Every published DiT-family FID was sampled over these lists (openai/guided-diffusion's ``respace.py``,
which DiT ships), so they are reproduced exactly, rounding quirks included:

- ``ddpm_timesteps(N)`` (ADM's ``space_timesteps(1000, "N")``): a fractional stride (T - 1) / (N - 1) is
  accumulated in floating point and each partial sum rounded to the nearest integer (halves to even). The
  accumulated rounding error makes 278 of the 1000 counts differ by one step somewhere from an evenly
  spaced ``linspace`` (N = 21 visits 499, not 500).
- ``ddim_timesteps(N)`` (ADM's ``"ddimN"``): ``range(0, T, i)`` for the smallest integer stride i that gives
  exactly N steps; only some counts have one (``DDIM_COUNTS``: N = 3 is {0, 334, 668}, not 1000 // 3).
"""
from __future__ import annotations

import bisect

NUM_TRAIN_TIMESTEPS = 1000


def ddpm_timesteps(num_steps: int, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> list[int]:
    """The N timesteps ADM's ``space_timesteps(T, "N")`` keeps, ascending; any N in 1..T."""
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"DDPM takes 1 to {num_train_timesteps} steps, got {num_steps}")
    stride = 1.0 if num_steps == 1 else (num_train_timesteps - 1) / (num_steps - 1)
    kept, position = [], 0.0
    for _ in range(num_steps):
        kept.append(round(position))
        position += stride  # accumulated, not multiplied: ADM's rounding depends on it
    return kept


def ddim_counts(num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> tuple[int, ...]:
    """Every N for which ADM's ``"ddimN"`` exists (an integer stride < T gives exactly N steps), ascending."""
    return tuple(sorted({len(range(0, num_train_timesteps, stride)) for stride in range(1, num_train_timesteps)}))


DDIM_COUNTS = ddim_counts()


def ddim_timesteps(num_steps: int, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> list[int]:
    """The timesteps of ADM's ``"ddimN"``, ascending: ``range(0, T, i)`` with the smallest stride i giving N.

    Raises a ValueError naming the nearest counts that exist when no integer stride gives exactly N.
    """
    for stride in range(1, num_train_timesteps):
        if len(range(0, num_train_timesteps, stride)) == num_steps:
            return list(range(0, num_train_timesteps, stride))
    counts = DDIM_COUNTS if num_train_timesteps == NUM_TRAIN_TIMESTEPS else ddim_counts(num_train_timesteps)
    at = bisect.bisect_left(counts, num_steps)
    nearest = sorted({counts[i] for i in (at - 1, at) if 0 <= i < len(counts)})
    raise ValueError(f"DDIM cannot take exactly {num_steps} steps of a {num_train_timesteps}-step schedule with an "
                     f"integer stride (ADM's ddimN); the nearest counts that can are "
                     f"{' or '.join(map(str, nearest))}")
