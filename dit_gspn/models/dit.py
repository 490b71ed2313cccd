"""The DiT backbone with adaLN-Zero, whose token mixer is GSPN or self-attention, and the model zoo.

Read top to bottom as facebookresearch/DiT's ``models.py``: the ``modulate`` helper, the
embedders, the block, the final layer, the model, then the zoo of named configurations. With
``mixer="attention"`` the model is DiT: the same parameter names and the same computation, so
the official checkpoints' state dicts load with ``strict=True``.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from dit_gspn.sizes import size_pair

from . import gspn_mixer, attention  # noqa: F401 (they register the built-in mixers)
from .mixer import MIXERS, BlockContext
from .pos_embed import sincos_pos_embed_2d
from .token_grid import check_grid


#: The constructor arguments GSPN's options had before ``mixer_kwargs``, and the option each one is now.
LEGACY_GSPN_ARGUMENTS = {"gspn_chunk": "chunk", "gspn_global_layers": "global_layers",
                         "gspn_proxy_ratio": "proxy_ratio", "gspn_gate_groups": "gate_groups",
                         "gspn_group_lam_u": "group_lam_u", "gspn_dwconv": "dwconv", "gspn_skip": "skip",
                         "gspn_output_gate": "output_gate"}
#: The defaults of those arguments in DiT's constructor of that time (the same in every version that had them):
#: a config.json written before one of them existed built the model with its default.
LEGACY_GSPN_DEFAULTS = {"gspn_chunk": 8, "gspn_global_layers": None, "gspn_proxy_ratio": 16,
                        "gspn_gate_groups": None, "gspn_group_lam_u": False, "gspn_dwconv": True, "gspn_skip": True,
                        "gspn_output_gate": True}


def upgrade_model_config(config: dict, complete: bool = False) -> dict:
    """``config`` (DiT's constructor arguments, e.g. a checkpoint's config.json or config.yaml's ``model``) with
    the ``gspn_*`` arguments of older checkpoints moved into ``mixer_kwargs`` (dropped for other mixers, which
    never read them); a config without them is returned as it is.

    ``complete``: ``config`` holds every argument the constructor of its time had (a ``save_pretrained``
    config.json), so a ``gspn_*`` argument it lacks took that constructor's default
    (:data:`LEGACY_GSPN_DEFAULTS`), which the upgraded config then names. A partial config (config.yaml's
    ``model``) leaves what it lacks to the zoo preset and the mixer's defaults."""
    legacy = {key: config[key] for key in LEGACY_GSPN_ARGUMENTS if key in config}
    if not legacy:
        return config
    if complete:
        legacy = {**LEGACY_GSPN_DEFAULTS, **legacy}
    upgraded = {key: value for key, value in config.items() if key not in LEGACY_GSPN_ARGUMENTS}
    if upgraded.get("mixer", "gspn") == "gspn":
        options = {LEGACY_GSPN_ARGUMENTS[key]: value for key, value in legacy.items()}
        upgraded["mixer_kwargs"] = {**options, **(upgraded.get("mixer_kwargs") or {})}
    return upgraded


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


#################################################################################
#               Embedding layers for patches, timesteps and class labels        #
#################################################################################


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> tokens (B, h * w, C), row-major; any H, W divisible by p."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """Embeds scalar timesteps into vector representations (DiT's frequencies: divided by half)."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
        """(N,) timesteps, possibly fractional -> (N, dim) [cos | sin] embedding, as DiT/GLIDE."""
        half = dim // 2
        freqs = torch.exp(
            -math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32, device=t.device) / half
        )
        args = t[:, None].float() * freqs[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Embeds class labels; drops them to the null class ``num_classes`` for classifier-free guidance."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.has_null_class = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + int(self.has_null_class), hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Replace labels by the null class, at random (training) or where ``force_drop_ids == 1``."""
        if force_drop_ids is None:
            drop_ids = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop_ids = force_drop_ids == 1
        return torch.where(drop_ids, self.num_classes, labels)

    def forward(self, labels: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None):
        # Only the dtype is checked here: the range is checked where labels enter (the dataset, the sampler, the
        # command line), since reading a device tensor's values would make every forward wait for the device.
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise TypeError(f"class labels must be an integer tensor, got dtype {labels.dtype}")
        if (train and self.dropout_prob > 0) or (force_drop_ids is not None):
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


#################################################################################
#                                 Core DiT Model                                #
#################################################################################


class Mlp(nn.Module):
    """Two-layer MLP with tanh-approximated GELU; keys ``fc1``/``fc2`` as timm's Mlp in DiT."""

    def __init__(self, in_features: int, hidden_features: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class DropPath(nn.Module):
    """Stochastic depth: while training, drop a residual branch for a random share ``p`` of the samples and
    scale it by 1 / (1 - p) for the others (timm's ``DropPath``); the identity when ``p`` is 0 or in eval mode."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"the drop-path rate must lie in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1.0 - self.p)
        return x * keep / (1.0 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class DiTBlock(nn.Module):
    """A DiT block with adaLN-Zero conditioning; its token mixer comes from the mixer registry by name.

    The mixer is held under its class's ``block_attribute`` (``attn`` for attention, DiT's key), so the
    state dict's keys are those of the checkpoints each mixer's models were released with.
    """

    def __init__(self, context: BlockContext, mlp_ratio: float = 4.0, mixer: str = "gspn",
                 mixer_kwargs: dict | None = None, drop_path: float = 0.0):
        super().__init__()
        hidden_size = context.hidden_size
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        token_mixer = MIXERS[mixer].for_block(context, **(mixer_kwargs or {}))
        self.mixer_attribute = token_mixer.block_attribute
        self.add_module(self.mixer_attribute, token_mixer)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))
        self.drop_path = DropPath(drop_path)

    @property
    def mixer(self) -> nn.Module:
        return getattr(self, self.mixer_attribute)

    def forward(self, x: torch.Tensor, c: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + self.drop_path(gate_msa.unsqueeze(1) * self.mixer(modulate(self.norm1(x), shift_msa, scale_msa), grid))
        x = x + self.drop_path(gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp)))
        return x


class FinalLayer(nn.Module):
    """The final layer of DiT: adaLN-modulated LayerNorm and a linear map to patch pixels."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiffusionBackbone(ModelMixin, ConfigMixin):
    """What the trainer and the samplers ask of a model, as DiT has it; every zoo family subclasses it.

    ``forward(x, t, y)`` and ``forward_with_cfg``; the attributes ``input_size``, ``patch_size``, ``in_channels``,
    ``out_channels``, ``num_classes``, ``learn_sigma`` and ``pos_embed`` (None without one); the embedders of
    patches, timesteps and labels (``init_embedders``, their initialisation ``init_embedder_weights``); the input
    checks, ``unpatchify`` and classifier-free guidance. A family's ``@register_to_config`` constructor calls
    ``init_embedders`` first, then builds its blocks and final layer.
    """

    _supports_gradient_checkpointing = True

    def init_embedders(self, input_size, patch_size: int, in_channels: int, hidden_size: int,
                       class_dropout_prob: float, num_classes: int, learn_sigma: bool) -> None:
        """The model's sizes as attributes (``grid_size``: the training grid of tokens) and its three embedders;
        a ValueError for a training size that the patches do not divide."""
        height, width = size_pair(input_size, "input_size")
        if height % patch_size or width % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        # int for a square training size (DiT's convention), (H, W) otherwise.
        self.input_size = input_size if isinstance(input_size, int) else (height, width)
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.num_classes = num_classes
        self.learn_sigma = learn_sigma
        self.grid_size = (height // patch_size, width // patch_size)
        self.gradient_checkpointing = False
        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)

    @staticmethod
    def xavier_linears(module: nn.Module) -> None:
        """DiT's basic initialisation of one module (``model.apply``): Xavier-uniform Linear weights, zero biases."""
        if isinstance(module, nn.Linear):
            torch.nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.constant_(module.bias, 0)

    def init_embedder_weights(self) -> None:
        """DiT's initialisation of the embedders: the patch projection as a Linear (not a Conv2d), the label
        table and the timestep MLP normal with std 0.02."""
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.proj.bias, 0)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)

    def run_block(self, block: nn.Module, *inputs):
        """``block(*inputs)``, through gradient checkpointing while it is on and gradients are recorded."""
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            return self._gradient_checkpointing_func(block, *inputs)
        return block(*inputs)

    def unpatchify(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """(B, h * w, p * p * C_out) tokens -> (B, C_out, h * p, w * p) images."""
        c, p = self.out_channels, self.patch_size
        h, w = check_grid(x, grid, "DiT.unpatchify")
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def _check_inputs(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"{type(self).__name__}: expected x of shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        H, W = x.shape[-2:]
        if H % self.patch_size or W % self.patch_size:
            raise ValueError(f"{type(self).__name__}: input size H x W = {H} x {W} is not divisible by the patch size "
                             f"{self.patch_size}")
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        if t.shape != (x.shape[0],) or y.shape != (x.shape[0],):
            raise ValueError(f"{type(self).__name__}: expected t and y of shape ({x.shape[0]},) for x of shape "
                             f"{tuple(x.shape)}, got t {tuple(t.shape)} and y {tuple(y.shape)}")
        return t

    def forward_with_cfg(self, x, t, y, cfg_scale: float, guided_channels: int | None = None) -> torch.Tensor:
        """Classifier-free guidance: the batch is the conditional half, then the unconditional half.

        The first half of ``x`` is used for both halves (as DiT); ``y``'s second half should hold
        the null class ``num_classes``. eps = uncond + cfg_scale * (cond - uncond) is applied to
        the first ``guided_channels`` output channels (default: all ``in_channels`` epsilon
        channels) and written to both halves; the remaining channels (the learned variance) pass
        through. ``guided_channels=3`` reproduces DiT's sample.py, which guided only the first
        three of four latent channels and was used for its published FIDs.
        """
        if len(x) % 2:
            raise ValueError(f"forward_with_cfg: the batch must hold a conditional and an unconditional half, "
                             f"got an odd batch size {len(x)}")
        if not self.y_embedder.has_null_class:
            raise ValueError("forward_with_cfg: this model has no null class (class_dropout_prob = 0)")
        guided = self.in_channels if guided_channels is None else guided_channels
        if not 0 < guided <= self.out_channels:
            raise ValueError(f"guided_channels must lie in [1, {self.out_channels}], got {guided_channels}")
        half = x[: len(x) // 2]
        combined = torch.cat([half, half], dim=0)
        model_out = self.forward(combined, t, y)
        eps, rest = model_out[:, :guided], model_out[:, guided:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        eps = torch.cat([half_eps, half_eps], dim=0)
        return torch.cat([eps, rest], dim=1)


class DiT(DiffusionBackbone):
    """Diffusion model with a transformer backbone whose token mixer is GSPN, self-attention or any registered one.

    The first ten arguments are facebookresearch/DiT's; ``input_size`` (the training size of the
    latent or pixel map) may also be an (H, W) pair. ``mixer`` names the token mixer (``dit_gspn.models.MIXERS``)
    and ``mixer_kwargs`` its own options (e.g. GSPN's ``chunk``, ``gate_groups``: ``GSPNMixer.for_block``).
    ``use_pos_embed`` adds the fixed sin-cos embedding (None: the mixer's ``wants_pos_embed``, on for attention,
    off for GSPN, which needs none and then runs at any resolution); it is recomputed for an input whose grid
    differs from the training grid ``input_size / patch_size``. ``drop_path`` is the stochastic-depth rate of
    the last block, rising linearly from 0 over the blocks (0: none, DiT's). ``num_classes`` is also the null
    class id used by label dropout and classifier-free guidance.
    """

    @classmethod
    def extract_init_dict(cls, config_dict, **kwargs):
        # A config.json written before the mixers had a registry holds GSPN's options as gspn_* arguments.
        return super().extract_init_dict(upgrade_model_config(config_dict, complete=True), **kwargs)

    @register_to_config
    def __init__(
        self,
        input_size: int | tuple[int, int] = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        mixer: str = "gspn",
        mixer_kwargs: dict | None = None,
        use_pos_embed: bool | None = None,
        drop_path: float = 0.0,
    ):
        super().__init__()
        MIXERS[mixer]  # an unknown name is an error naming the registered mixers
        self.mixer = mixer
        self.init_embedders(input_size, patch_size, in_channels, hidden_size, class_dropout_prob, num_classes,
                            learn_sigma)
        if use_pos_embed is None:
            use_pos_embed = MIXERS[mixer].wants_pos_embed
        if use_pos_embed:
            # A buffer, not a parameter: it is fixed, but stays in the state dict under DiT's key.
            self.register_buffer("pos_embed", torch.zeros(1, self.grid_size[0] * self.grid_size[1], hidden_size))
        else:
            self.pos_embed = None

        drop_rates = [float(drop_path) * i / max(depth - 1, 1) for i in range(depth)]  # 0 .. drop_path
        self.blocks = nn.ModuleList(
            DiTBlock(BlockContext(hidden_size, num_heads, i, depth), mlp_ratio, mixer, mixer_kwargs, drop_rates[i])
            for i in range(depth)
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's initialisation: Xavier-uniform linears, then zero the adaLN modulations and the final layer.

        Zeroing every block's modulation (hence its gates) and the final projection makes each
        block the identity and the model output zero at initialisation (adaLN-Zero).
        """

        self.apply(self.xavier_linears)
        if self.pos_embed is not None:
            self.pos_embed.copy_(sincos_pos_embed_2d(self.pos_embed.shape[-1], *self.grid_size).unsqueeze(0))
        self.init_embedder_weights()

        for block in self.blocks:
            block.mixer.reset_parameters()
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)

        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    def positional_embedding(self, grid: tuple[int, int], dtype: torch.dtype, device) -> torch.Tensor:
        """(1, h * w, C) sin-cos embedding for ``grid``: the stored one at the training grid."""
        if tuple(grid) == self.grid_size:
            return self.pos_embed.to(dtype)
        return sincos_pos_embed_2d(self.pos_embed.shape[-1], *grid).to(device=device, dtype=dtype).unsqueeze(0)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) with H, W divisible by the patch size; t: (B,) or scalar timesteps; y: (B,) labels.

        Returns (B, 2C, H, W) when ``learn_sigma`` (epsilon, then the variance interpolation), else (B, C, H, W).
        """
        t = self._check_inputs(x, t, y)
        grid = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        x = self.x_embedder(x)
        if self.pos_embed is not None:
            x = x + self.positional_embedding(grid, x.dtype, x.device)
        c = self.t_embedder(t) + self.y_embedder(y, self.training)
        for block in self.blocks:
            x = self.run_block(block, x, c, grid)
        x = self.final_layer(x, c)
        return self.unpatchify(x, grid)
