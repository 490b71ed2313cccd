"""SiT's SDE sampler for flow-matching models: Euler-Maruyama with SiT's diffusion coefficient and last step.

SiT (Ma et al. 2024, ``transport.Sampler.sample_sde`` with the defaults of its ``sample.py``) integrates the
reverse SDE  dx = [v + w score] dt + sqrt(2 w) dW  in its own time t (0 = noise, 1 = data), with the
diffusion coefficient w(t) = 1 - t ("sigma" form, norm 1), over N - 1 Euler-Maruyama steps on
``linspace(0, 1 - 0.04, N)``, then one noise-free step of 0.04 along the SDE's drift ("Mean" last step):
N model evaluations, landing on t = 1.

Here the same sampler is written in this project's convention (``flow.py``): noise level s = 1 - t, the model
predicts u = eps - x_0 (SiT's velocity is -u), so the noise it implies is eps = x + (1 - s) u, the score is
-eps / s, w = s, and a step from s to s - h is  x + h (-u + w score) + sqrt(2 w h) z  (no z on the last one).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from diffusers.schedulers.scheduling_utils import SchedulerOutput
from diffusers.utils.torch_utils import randn_tensor

from .flow import shift_noise_levels

#: SiT's ``--last-step-size``: the noise level the Euler-Maruyama steps stop at, removed by one drift step.
SIT_LAST_STEP_SIZE = 0.04


class FlowSDEScheduler:
    """The Euler-Maruyama sampler above, with diffusers' scheduler interface (``set_timesteps``, ``step``)."""

    order = 1

    def __init__(self, num_train_timesteps: int = 1000, last_step_size: float = SIT_LAST_STEP_SIZE,
                 shift: float = 1.0):
        if not 0 < last_step_size < 1:
            raise ValueError(f"last_step_size must be in (0, 1), got {last_step_size}")
        self.num_train_timesteps = int(num_train_timesteps)
        self.last_step_size = float(last_step_size)
        self.shift = float(shift)
        self.sigmas = self.timesteps = None
        self._step_index = 0

    def set_timesteps(self, num_inference_steps: int) -> None:
        """N noise levels from 1 down to ``last_step_size`` evenly (SiT's grid), shifted; then 0 (float64)."""
        if num_inference_steps < 2:
            raise ValueError(f"the sde sampler takes at least 2 steps (SiT's grid has N - 1 Euler-Maruyama steps "
                             f"and a last one), got {num_inference_steps}")
        levels = shift_noise_levels(np.linspace(1.0, self.last_step_size, num_inference_steps), self.shift)
        self.sigmas = torch.from_numpy(np.append(levels, 0.0))
        self.timesteps = (self.sigmas[:-1] * self.num_train_timesteps).float()
        self._step_index = 0

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor,
             generator=None, return_dict: bool = True) -> SchedulerOutput:
        """One step from the current noise level to the next; ``model_output`` is the velocity u = eps - x_0.

        Draws the step's noise with ``generator`` (one, or one per sample) in ``sample``'s dtype; the last
        step draws none.
        """
        k = self._step_index
        s, s_next = float(self.sigmas[k]), float(self.sigmas[k + 1])
        h = s - s_next
        diffusion = s  # SiT's w(t) = 1 - t
        score = -(sample + (1.0 - s) * model_output) / s
        mean = sample + h * (-model_output + diffusion * score)
        if k + 1 == len(self.timesteps):
            prev = mean
        else:
            noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
            prev = mean + math.sqrt(2.0 * diffusion * h) * noise
        self._step_index += 1
        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)
