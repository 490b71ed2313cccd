"""SiT's models in our flow-matching convention, so that the Euler and Heun samplers draw from them.

willisma/SiT trains DiT's network on the linear interpolant x_t = t x_1 + (1 - t) x_0 with x_0 the noise and
x_1 the data (t = 0 noise, t = 1 data), calls it with t in [0, 1] and has it predict u_t = x_1 - x_0.
Ours (diffusers' FlowMatch convention) is x_s = (1 - s) x_0 + s eps with s the noise level, the model sees
``1000 s`` and predicts eps - x_0. The two paths are the same with s = 1 - t, and eps - x_0 = -(x_1 - x_0):
the wrapper maps the time and flips the sign. A SiT with learn_sigma heads (its released SiT-XL/2) outputs
2C channels; its first C are the velocity.
"""
from __future__ import annotations

import torch
from torch import nn

#: ``--model`` names of SiT checkpoints: SiT-S/2 ... SiT-XL/8, each DiT's network of the same size.
SIT_PREFIX = "SiT-"


def is_sit_name(name: str | None) -> bool:
    return name is not None and name.startswith(SIT_PREFIX)


def network_name(name: str) -> str:
    """The zoo name of the network a ``--model`` name loads into: ``SiT-XL/2`` -> ``DiT-XL/2``, others as given."""
    return "DiT-" + name[len(SIT_PREFIX):] if is_sit_name(name) else name


class SiTVelocity(nn.Module):
    """A SiT-convention network (``net(x, t, y)``, t in [0, 1], t = 1 data, output data - noise in its first
    ``in_channels`` channels) as a flow model of ours: ``forward(x, 1000 s, y)`` returns noise - data at
    noise level s, with ``in_channels`` output channels; ``forward_with_cfg`` guides as the network does."""

    def __init__(self, net: nn.Module, num_train_timesteps: int = 1000):
        super().__init__()
        self.net = net
        self.num_train_timesteps = num_train_timesteps
        self.in_channels = net.in_channels
        self.out_channels = net.in_channels
        self.num_classes = net.num_classes
        self.input_size = net.input_size
        self.patch_size = net.patch_size

    @property
    def pos_embed(self):
        return getattr(self.net, "pos_embed", None)

    def sit_time(self, timestep: torch.Tensor) -> torch.Tensor:
        """Our model timestep (1000 x noise level) -> SiT's t (1 - noise level)."""
        return 1.0 - timestep.float() / self.num_train_timesteps

    def _velocity(self, out: torch.Tensor) -> torch.Tensor:
        return -out[:, : self.in_channels]

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self._velocity(self.net(x, self.sit_time(t), y))

    def forward_with_cfg(self, x, t, y, cfg_scale: float, guided_channels: int | None = None) -> torch.Tensor:
        # Guidance is linear in the output, so guiding SiT's velocity and then flipping it equals guiding ours.
        return self._velocity(self.net.forward_with_cfg(x, self.sit_time(t), y, cfg_scale, guided_channels))
