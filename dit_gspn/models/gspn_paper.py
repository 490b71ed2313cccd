"""The GSPN authors' diffusion network (NVlabs/GSPN, ``generation/gspn.py``), beside the project's GSPN-DiT.

The network the GSPN paper's ImageNet-256 table was made with is not DiT's: it reads as U-ViT with
Mamba-style blocks. Tokens (patches + t_emb + y_emb, added once) run through ``depth / 2`` in-blocks, a
mid block and ``depth / 2`` out-blocks; each out-block first merges the matching in-block's output through
``skip_linear(cat[h, skip])``. A block has no MLP and no adaLN: it adds its input to a separate residual
stream, normalises the stream (affine LayerNorm) and mixes it with :class:`GSPNPaperMixer`. A final affine
norm and DiT's adaLN final layer (the only conditioning after the input) give the output.

The mixer differs from :class:`dit_gspn.models.gspn_mixer.GSPNMixer` too: in_proj without bias and a 7x7
depthwise conv, no activation; per-channel gates, lam, u and skip D for each direction, all bias-free maps of
a C // 16 proxy; a learnable scalar per direction to merge them; a 1x1 + 3x3-depthwise output with
``y * relu(y)``, no norm and no gate.

Two switches say which of the authors' networks is built:

- ``directions="as_released"``: what their code computes and their checkpoints were trained with. It scans
  four copies [x, x^T, flip(x), flip(x^T)] left to right, multiplies each by u_d (and adds D_d * copy) at the
  *array* position, and sums the four without mapping them back, so only the left-right scan lands on its
  own pixels. It needs a square token grid. ``"aligned"``: each direction's output on the pixels its gates
  were computed for (the fused :func:`dit_gspn.ops.gspn_scan`), any grid: the default for new training.
- ``chunk`` and ``global_layers``: the scans restart every ``chunk`` steps except in the last
  ``global_layers`` blocks. Their code meant chunk 2 with the last 2 out-blocks global (the default here);
  as released, every block scans with chunk 2 (``global_layers=0``: the block passes its argument, not its
  attribute, to the scan).

:data:`AS_RELEASED` is both; :func:`authors_config` and :func:`from_authors_state_dict` read their
``train.py`` checkpoints into this class (``sample.py --model GSPN-paper-XL/2 --ckpt 0400000.pt``).
"""
from __future__ import annotations

import math
import re

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import register_to_config

from dit_gspn import ops
from dit_gspn.ops import NUM_DIRECTIONS
from dit_gspn.ops.reference import to_scan_frame

from .dit import DiffusionBackbone, DropPath, FinalLayer
from .mixer import BlockContext, TokenMixer, register_mixer, scan_chunk
from .token_grid import channel_first, check_grid, map_to_tokens, tokens_to_map
from .zoo import register_family

DIRECTION_MODES = ("aligned", "as_released")
#: The switches the authors' checkpoints were trained with.
AS_RELEASED = dict(directions="as_released", chunk=2, global_layers=0)
#: For each of our directions (top_down, bottom_up, left_right, right_left: ``dit_gspn.ops.DIRECTIONS``), its
#: index in the authors' order (left-right, top-down, right-left, bottom-up: the copies x, x^T, flip(x),
#: flip(x^T) scanned left to right).
AUTHORS_DIRECTION = (1, 3, 0, 2)


@register_mixer("gspn-paper")
class GSPNPaperMixer(TokenMixer):
    """The authors' GSPN mixer: (B, N, C) tokens on their (h, w) grid -> (B, N, C) tokens.

    Args:
        dim: channels C.
        chunk: restart every scan every ``chunk`` steps; None scans the whole map.
        directions: ``"aligned"`` or ``"as_released"`` (the module's docstring says what each computes).
        proxy_ratio: the proxy every per-pixel map is made from has ``dim // proxy_ratio`` channels.

    Parameters (the authors' 1x1 convolutions are the linear layers): ``in_proj`` (C -> C), ``dwconv`` (7x7
    depthwise), ``proxy`` (C -> r), ``gate_proj`` (r -> 12 C: [gl | gc | gr], each (4 directions, C)),
    ``lam_proj``, ``u_proj`` and ``skip_proj`` (r -> 4 C, (direction, channel)), ``merge`` (4), then
    ``out_pointwise`` (C -> C), ``out_dwconv`` (3x3 depthwise) and ``out_proj`` (C -> C); no biases but the
    7x7 conv's.
    """

    @classmethod
    def for_block(cls, context: BlockContext, chunk: int | None = 2, global_layers: int = 2,
                  directions: str = "aligned", proxy_ratio: int = 16) -> "GSPNPaperMixer":
        """The mixer of one block: the last ``global_layers`` blocks scan globally, the others restart every
        ``chunk`` steps. The defaults are the authors' network as meant (:data:`AS_RELEASED` as trained)."""
        local = context.scans_locally(global_layers)
        return cls(context.hidden_size, chunk=chunk if local else None, directions=directions,
                   proxy_ratio=proxy_ratio)

    def __init__(self, dim: int, chunk: int | None = 2, directions: str = "aligned", proxy_ratio: int = 16):
        super().__init__()
        if directions not in DIRECTION_MODES:
            raise ValueError(f"directions must be one of {DIRECTION_MODES}, got {directions!r}")
        if proxy_ratio < 1:
            raise ValueError(f"proxy_ratio must be >= 1, got {proxy_ratio}")
        self.dim = dim
        self.chunk = scan_chunk(chunk)
        self.directions = directions
        self.proxy_dim = max(1, dim // proxy_ratio)
        D, r = NUM_DIRECTIONS, self.proxy_dim

        self.in_proj = nn.Linear(dim, dim, bias=False)
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.proxy = nn.Linear(dim, r, bias=False)
        self.gate_proj = nn.Linear(r, 3 * D * dim, bias=False)
        self.lam_proj = nn.Linear(r, D * dim, bias=False)
        self.u_proj = nn.Linear(r, D * dim, bias=False)
        self.skip_proj = nn.Linear(r, D * dim, bias=False)
        self.merge = nn.Parameter(torch.empty(D))
        self.out_pointwise = nn.Linear(dim, dim, bias=False)
        self.out_dwconv = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim, bias=False)
        self.out_proj = nn.Linear(dim, dim, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The authors' initialisation after a model's Xavier pass over its linear layers: their 1x1 convs keep
        PyTorch's default convolution init (the same as ``nn.Linear``'s own), the merge too (a 4 -> 1 conv:
        uniform in +-1/2); in_proj and out_proj, linear layers in their code too, keep Xavier."""
        for layer in (self.proxy, self.gate_proj, self.lam_proj, self.u_proj, self.skip_proj, self.out_pointwise):
            layer.reset_parameters()
        nn.init.uniform_(self.merge, -1.0 / math.sqrt(NUM_DIRECTIONS), 1.0 / math.sqrt(NUM_DIRECTIONS))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, chunk={self.chunk}, directions={self.directions!r}, proxy_dim={self.proxy_dim}"

    def _merged(self, layer: nn.Linear) -> torch.Tensor:
        """``layer``'s (4 C, r) weight with each direction's rows scaled by its merge weight."""
        return (layer.weight.view(NUM_DIRECTIONS, self.dim, -1) * self.merge[:, None, None]).flatten(0, 1)

    def propagate(self, x: torch.Tensor, p: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """sum_d merge_d (u_d * scan_d(x) + D_d * x) for (B, N, C) tokens x and (B, N, r) proxy p: (B, N, C)
        tokens (as released, x is the direction's copy and nothing is mapped back: :func:`as_released_scan`)."""
        h, w = grid
        B, N, C = x.shape
        gates = channel_first(self.gate_proj(p), h, w).view(B, 3, NUM_DIRECTIONS, C, h, w)
        gl, gc, gr = gates.unbind(1)
        if self.directions == "aligned":
            maps = F.linear(p, torch.cat([self.lam_proj.weight, self._merged(self.u_proj)]))
            lam, u = channel_first(maps, h, w).view(B, 2, NUM_DIRECTIONS, C, h, w).unbind(1)
            y = ops.gspn_scan(tokens_to_map(x, h, w), lam, gl, gc, gr, u, chunk=self.chunk)
            skip = F.linear(p, self._merged(self.skip_proj).view(NUM_DIRECTIONS, C, -1).sum(0))
            return torch.addcmul(map_to_tokens(y), skip, x)
        if h != w:
            raise ValueError(f"GSPNPaperMixer: directions='as_released' scans transposed copies of the map and "
                             f"needs a square token grid, got (h, w) = ({h}, {w}); use directions='aligned'")
        maps = F.linear(p, torch.cat([self.lam_proj.weight, self._merged(self.u_proj), self._merged(self.skip_proj)]))
        lam, u, skip = channel_first(maps, h, w).view(B, 3, NUM_DIRECTIONS, C, h, w).unbind(1)
        return map_to_tokens(as_released_scan(tokens_to_map(x, h, w), lam, gl, gc, gr, u, skip, self.chunk))

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        h, w = check_grid(tokens, grid, "GSPNPaperMixer")
        B, N, C = tokens.shape
        if C != self.dim:
            raise ValueError(f"GSPNPaperMixer: expected {self.dim} channels, got tokens of shape {tuple(tokens.shape)}")
        x = map_to_tokens(self.dwconv(tokens_to_map(self.in_proj(tokens), h, w)))
        y = self.out_pointwise(self.propagate(x, self.proxy(x), (h, w)))
        y = map_to_tokens(self.out_dwconv(tokens_to_map(y, h, w)))
        return self.out_proj(y * F.relu(y))


def as_released_scan(x, lam, gl, gc, gr, u, skip, chunk: int | None = None) -> torch.Tensor:
    """The authors' four-direction propagation as released: (B, C, n, n) map -> (B, C, n, n).

    lam, gl, gc, gr, u, skip: (B, 4, C, n, n), direction d in our order, all at *array* positions. Direction
    d scans the copy of x whose left-to-right scan is d (x^T for top-down, flip(x^T) for bottom-up, x for
    left-right, flip(x) for right-left), with neighbours along the copy's height, and
    ``y = sum_d u_d * scan_d + skip_d * copy_d``, each term left where it lies in its copy's array. In our
    scan frame (scan along dim -2) the copy's transpose is ``to_scan_frame(x, d)`` and the per-pixel maps are
    transposed: one :func:`dit_gspn.ops.line_scan` over the four stacked copies.
    """
    def t(m):
        return m.transpose(-1, -2)

    frames = torch.stack([to_scan_frame(x, d) for d in range(NUM_DIRECTIONS)], dim=1)  # (B, 4, C, n, n)
    wl, wc, wr = ops.normalize_gates(t(gl), t(gc), t(gr))
    scanned = ops.line_scan(frames, t(lam), wl, wc, wr, chunk=chunk)
    return t((t(u) * scanned + t(skip) * frames).sum(1))


class GSPNPaperBlock(nn.Module):
    """One block of the authors' network: optional long-skip merge, pre-norm residual stream, GSPN mixer.

    ``forward(h, residual, grid, skip)`` adds ``h`` (the previous block's output, merged with ``skip`` through
    ``skip_linear`` in an out-block) to the residual stream, through stochastic depth, and returns the
    mixer's output on the normalised stream together with the stream.
    """

    def __init__(self, context: BlockContext, long_skip: bool, drop_path: float, mixer_options: dict):
        super().__init__()
        hidden_size = context.hidden_size
        self.skip_linear = nn.Linear(2 * hidden_size, hidden_size) if long_skip else None
        self.drop_path = DropPath(drop_path)
        self.norm = nn.LayerNorm(hidden_size, eps=1e-5)
        self.token_mixer = GSPNPaperMixer.for_block(context, **mixer_options)

    def forward(self, h: torch.Tensor, residual: torch.Tensor | None, grid: tuple[int, int],
                skip: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.skip_linear is not None:
            h = self.skip_linear(torch.cat([h, skip], dim=-1))
        residual = h if residual is None else residual + self.drop_path(h)
        return self.token_mixer(self.norm(residual), grid), residual


class GSPNPaper(DiffusionBackbone):
    """The GSPN authors' class-conditional diffusion network (U-ViT-like, no MLP, conditioning added once).

    ``depth`` is theirs: ``depth // 2`` in-blocks and as many out-blocks around one mid block, so
    ``depth + 1`` blocks (GSPN-paper-XL: 56, 57 blocks). ``directions``, ``chunk`` and ``global_layers`` are
    the mixer's (:class:`GSPNPaperMixer`; :data:`AS_RELEASED` for the authors' checkpoints). ``drop_path`` is
    their stochastic depth: block k's input to the residual stream is dropped at rate
    ``drop_path * (k - 1) / (depth - 1)`` (k >= 1) and the last block's output at ``drop_path`` (0: none).
    The other arguments are DiT's. There is no positional embedding (``pos_embed`` is None).
    """

    @register_to_config
    def __init__(
        self,
        input_size: int | tuple[int, int] = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1500,
        depth: int = 56,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        directions: str = "aligned",
        chunk: int | None = 2,
        global_layers: int = 2,
        proxy_ratio: int = 16,
        drop_path: float = 0.0,
    ):
        super().__init__()
        if depth < 2 or depth % 2:
            raise ValueError(f"depth must be an even number >= 2 (depth / 2 in-blocks and out-blocks around a mid "
                             f"block), got {depth}")
        self.init_embedders(input_size, patch_size, in_channels, hidden_size, class_dropout_prob, num_classes,
                            learn_sigma)
        self.pos_embed = None

        blocks = depth + 1
        rates = [0.0] + [float(drop_path) * i / (depth - 1) for i in range(depth)]  # the rate for block k's input
        mixer_options = dict(chunk=chunk, global_layers=global_layers, directions=directions, proxy_ratio=proxy_ratio)

        def block(index: int) -> GSPNPaperBlock:
            context = BlockContext(hidden_size, 0, index, blocks)  # no heads
            return GSPNPaperBlock(context, index > depth // 2, rates[index], mixer_options)

        self.in_blocks = nn.ModuleList(block(i) for i in range(depth // 2))
        self.mid_block = block(depth // 2)
        self.out_blocks = nn.ModuleList(block(i) for i in range(depth // 2 + 1, blocks))
        self.last_drop_path = DropPath(drop_path)  # on the last block's output (not `drop_path`: a config name)
        self.norm_f = nn.LayerNorm(hidden_size, eps=1e-5)
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The authors' (DiT's) initialisation: Xavier-uniform linear layers, the embedders as DiT's, each
        mixer's own (:meth:`GSPNPaperMixer.reset_parameters`), and the adaLN final layer zeroed, so that the
        model outputs zero at initialisation."""

        self.apply(self.xavier_linears)
        self.init_embedder_weights()
        for block in self.blocks:
            block.token_mixer.reset_parameters()
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.constant_(layer.weight, 0)
            nn.init.constant_(layer.bias, 0)

    @property
    def blocks(self) -> list[GSPNPaperBlock]:
        """Every block in the order the tokens pass them: in-blocks, mid block, out-blocks."""
        return [*self.in_blocks, self.mid_block, *self.out_blocks]

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) with H, W divisible by the patch size (and the grid square for ``as_released``);
        t: (B,) or scalar timesteps; y: (B,) integer labels. Returns (B, 2C, H, W) when ``learn_sigma``
        (epsilon, then the variance interpolation), else (B, C, H, W)."""
        t = self._check_inputs(x, t, y)
        grid = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        c = self.t_embedder(t) + self.y_embedder(y, self.training)
        h, residual = self.x_embedder(x) + c.unsqueeze(1), None
        skips = []
        for block in self.in_blocks:
            h, residual = self.run_block(block, h, residual, grid)
            skips.append(h)
        h, residual = self.run_block(self.mid_block, h, residual, grid)
        for block in self.out_blocks:
            h, residual = self.run_block(block, h, residual, grid, skips.pop())
        h = self.norm_f(residual + self.last_drop_path(h))
        return self.unpatchify(self.final_layer(h, c), grid)


#################################################################################
#                    The authors' train.py checkpoints                          #
#################################################################################

#: Each key of an authors' block -> (its key in ours, how its tensor becomes ours).
_BLOCK_KEYS = {
    "in_proj.weight": "token_mixer.in_proj.weight",
    "conv2d.weight": "token_mixer.dwconv.weight",
    "conv2d.bias": "token_mixer.dwconv.bias",
    "x_conv_down.weight": "token_mixer.proxy.weight",
    "w_conv_up.weight": "token_mixer.gate_proj.weight",
    "l_conv_up.weight": "token_mixer.lam_proj.weight",
    "u_conv_up.weight": "token_mixer.u_proj.weight",
    "d_conv.weight": "token_mixer.skip_proj.weight",
    "m_conv.weight": "token_mixer.merge",
    "out_conv.weight": "token_mixer.out_pointwise.weight",
    "out_dconv.weight": "token_mixer.out_dwconv.weight",
    "out_proj.weight": "token_mixer.out_proj.weight",
    "norm.weight": "norm.weight",
    "norm.bias": "norm.bias",
    "skip_linear.weight": "skip_linear.weight",
    "skip_linear.bias": "skip_linear.bias",
}
_BLOCK_KEY = re.compile(r"^((?:in_blocks|out_blocks)\.\d+|mid_block)\.(.+)$")
_TOP_KEYS = ("x_embedder.proj.weight", "x_embedder.proj.bias", "t_embedder.mlp.0.weight", "t_embedder.mlp.0.bias",
             "t_embedder.mlp.2.weight", "t_embedder.mlp.2.bias", "y_embedder.embedding_table.weight",
             "norm_f.weight", "norm_f.bias", "final_layer.linear.weight", "final_layer.linear.bias",
             "final_layer.adaLN_modulation.1.weight", "final_layer.adaLN_modulation.1.bias")


def _our_direction_order(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """(groups * 4 * C, ...) rows in the authors' direction order -> ours (:data:`AUTHORS_DIRECTION`)."""
    rows = weight.reshape(groups, NUM_DIRECTIONS, -1, *weight.shape[1:])
    return rows[:, list(AUTHORS_DIRECTION)].reshape(weight.shape)


def _block_tensor(suffix: str, value: torch.Tensor) -> torch.Tensor:
    """An authors' block tensor as ours: 1x1 conv kernels as matrices, directions in our order."""
    if suffix == "m_conv.weight":
        return value.reshape(NUM_DIRECTIONS)[list(AUTHORS_DIRECTION)]
    if suffix in ("in_proj.weight", "x_conv_down.weight", "out_conv.weight"):
        return value.reshape(value.shape[0], value.shape[1])
    if suffix in ("w_conv_up.weight", "l_conv_up.weight", "u_conv_up.weight", "d_conv.weight"):
        matrix = value.reshape(value.shape[0], value.shape[1])
        return _our_direction_order(matrix, 3 if suffix == "w_conv_up.weight" else 1)
    return value


def from_authors_state_dict(state: dict) -> dict:
    """The state dict of an authors' ``GSPN`` (their key names, conv kernels, direction order) in
    :class:`GSPNPaper`'s. A key that is neither theirs nor ours raises a ValueError naming it (a missing one
    is left to ``load_state_dict``'s strict check)."""
    ours, unknown = {}, []
    for key, value in state.items():
        if key in _TOP_KEYS:
            ours[key] = value
            continue
        match = _BLOCK_KEY.match(key)
        if match is None or match.group(2) not in _BLOCK_KEYS:
            unknown.append(key)
            continue
        block, suffix = match.groups()
        ours[f"{block}.{_BLOCK_KEYS[suffix]}"] = _block_tensor(suffix, value)
    if unknown:
        raise ValueError(f"{len(unknown)} keys are not those of the authors' GSPN (generation/gspn.py, trained "
                         f"with no_aln_0=False), e.g. {', '.join(unknown[:3])}")
    return ours


def authors_config(state: dict) -> dict:
    """:class:`GSPNPaper` arguments read from an authors' state dict's shapes (width, depth, patch, channels,
    learned sigma, classes), with :data:`AS_RELEASED`: the mode their weights were trained in. The training
    size is not in the shapes (no positional embedding). A ValueError names what does not fit their layout."""
    try:
        hidden, in_channels, patch, _ = state["x_embedder.proj.weight"].shape
        in_blocks = {int(m.group(1)) for k in state if (m := re.match(r"in_blocks\.(\d+)\.", k))}
        out_blocks = {int(m.group(1)) for k in state if (m := re.match(r"out_blocks\.(\d+)\.", k))}
        proxy = state["mid_block.x_conv_down.weight"].shape[0]
        out_channels = state["final_layer.linear.weight"].shape[0] // (patch * patch)
        table_rows = state["y_embedder.embedding_table.weight"].shape[0]
        state["final_layer.adaLN_modulation.1.weight"]
    except (KeyError, ValueError) as err:
        raise ValueError(f"not the authors' GSPN layout (x_embedder, in_blocks.N, mid_block, out_blocks.N, "
                         f"final_layer with adaLN, y_embedder): {type(err).__name__}: {err}") from err
    if not in_blocks or in_blocks != out_blocks or in_blocks != set(range(len(in_blocks))):
        raise ValueError(f"the authors' GSPN has as many in-blocks as out-blocks, numbered from 0: found in-blocks "
                         f"{sorted(in_blocks)[:4]}... and out-blocks {sorted(out_blocks)[:4]}...")
    if proxy != max(1, hidden // 16):
        raise ValueError(f"mid_block.x_conv_down.weight has {proxy} proxy channels; the authors' width {hidden} "
                         f"has {hidden // 16}")
    if out_channels not in (in_channels, 2 * in_channels):
        raise ValueError(f"the final layer outputs {out_channels} channels for {in_channels} inputs")
    # Their train.py always trains with label dropout (0.1), so the table holds the null class too.
    return dict(hidden_size=int(hidden), in_channels=int(in_channels), patch_size=int(patch),
                depth=2 * len(in_blocks), learn_sigma=out_channels == 2 * in_channels,
                num_classes=int(table_rows) - 1, **AS_RELEASED)


#: The authors' sizes (hidden_size, depth) by size name: XL/2 has 723,513,260 parameters.
SIZES = {"XL": dict(hidden_size=1500, depth=56), "L": dict(hidden_size=1200, depth=56),
         "B": dict(hidden_size=900, depth=30), "S": dict(hidden_size=368, depth=24)}
PATCHES = (2, 4)

register_family("GSPN-paper", GSPNPaper, SIZES, PATCHES)
