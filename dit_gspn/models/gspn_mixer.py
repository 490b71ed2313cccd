"""The GSPN token mixer: four directional, input-gated 2-D linear propagations of the token map.

Tokens (B, N, C) on an (h, w) grid go through:

1. ``in_proj`` (C -> C for the scanned map, plus C for the output gate z when ``output_gate``),
   an optional depthwise 3x3 convolution (as in the authors' block) and SiLU: the map x;
2. a low-rank proxy p = ``proxy``(x) (C -> C / ``proxy_ratio`` channels) from which every
   input-dependent quantity is projected: the raw gate logits gl, gc, gr (4 directions x
   ``gate_groups`` channel groups), lam and u (4 directions x ``gate_groups`` with
   ``group_lam_u``, else 4 directions x C), and the skip D (C);
3. the fused four-direction scan: for each direction d the normalised gates drive the line
   recurrence over x, the result is mapped back to the original pixel positions, multiplied
   by u_d, and the four are summed (all inside the op, so no flipped or transposed copy of
   x is made here, and every direction's output lands on the pixel its gates were computed
   for); then + D * x. The five per-pixel maps come from one GEMM of p and go to
   ``dit_gspn.ops.gspn_scan``: gl, gc, gr are (B, 4, G, h, w); lam and u are too with ``group_lam_u``,
   else (B, 4, C, h, w);
4. LayerNorm over channels, times SiLU(z) when ``output_gate``, and ``out_proj``.

The learnable linear merge of the four directions is a per-direction weight ``merge`` (4, G)
with ``group_lam_u``, else (4, C), folded into u's projection (u_d = merge_d * (W_u p + b_u)_d):
the merge costs a weight scaling, not a pass over a (B, 4, C, H, W) map. It starts at 1/4 and u's
bias at 1, so that at initialisation the mixer averages the four directions.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from dit_gspn import ops

from dit_gspn.ops import NUM_DIRECTIONS

from .mixer import BlockContext, TokenMixer, register_mixer, scan_chunk
from .token_grid import channel_first, check_grid, map_to_tokens, tokens_to_map


class ScanOperands(NamedTuple):
    """The scan's inputs, all in the original pixel frame.

    x: (B, C, h, w) channels-last view of x_tokens, the same map as (B, N, C) tokens; gl, gc, gr: (B, 4, G, h, w)
    raw gate logits (the op normalises them); lam, u: (B, 4, S, h, w) with S = G when lam and u are grouped,
    else C (u with the merge folded in); skip: (B, N, C) tokens or None; z: (B, N, C) output gate or None.
    """
    x: torch.Tensor
    x_tokens: torch.Tensor
    gl: torch.Tensor
    gc: torch.Tensor
    gr: torch.Tensor
    lam: torch.Tensor
    u: torch.Tensor
    skip: torch.Tensor | None
    z: torch.Tensor | None


@register_mixer("gspn")
class GSPNMixer(TokenMixer):
    """GSPN token mixer: (B, N, C) tokens with their (h, w) grid -> (B, N, C) tokens.

    The defaults are the zoo's GSPN models' (:meth:`for_block` passes the options on): 8 channel groups share
    each direction's gates, lam and u, and the proxy has C / 4 channels (the parameters the grouped maps no
    longer need go to a wider proxy, which keeps every GSPN model within 3% of its DiT's parameter count); on
    the demo's dataset grouped maps trained at least as well as per-channel ones and faster (docs/results.md,
    "The demo's quality"). ``gate_groups=None, group_lam_u=False, proxy_ratio=16`` is the authors'
    per-channel mixer.

    Args:
        dim: channels C.
        chunk: None for a global scan over the whole height/width; k restarts the propagation
            every k steps along each scan (a local GSPN layer).
        proxy_ratio: the proxy has ``max(1, dim // proxy_ratio)`` channels.
        gate_groups: number of channel groups sharing one set of propagation gates (gl, gc, gr);
            None gives every channel its own gates. Must divide ``dim``.
        group_lam_u: share lam and u (and the merge) over the same channel groups as the gates, instead
            of giving every channel its own: every per-pixel map is then 4 x ``gate_groups`` wide.
        dwconv: depthwise 3x3 convolution on the map before the scan.
        skip: add the input-dependent skip D * x.
        output_gate: multiply the normalised output by SiLU(z), z a second half of ``in_proj``.
    """

    block_attribute = "gspn"

    @classmethod
    def for_block(cls, context: BlockContext, chunk: int | None = 8, global_layers: int | None = None,
                  **options) -> "GSPNMixer":
        """The mixer of one block of a model: blocks ``depth - global_layers`` and later scan globally, the
        others restart every ``chunk`` steps (``global_layers=None``: the last ``depth // 4``; ``chunk=None``:
        every block global). The other ``options`` are the constructor's, passed on."""
        if global_layers is None:
            global_layers = context.depth // 4
        local = context.scans_locally(global_layers) and chunk is not None
        return cls(context.hidden_size, chunk=chunk if local else None, **options)

    def __init__(
        self,
        dim: int,
        chunk: int | None = None,
        proxy_ratio: int = 4,
        gate_groups: int | None = 8,
        group_lam_u: bool = True,
        dwconv: bool = True,
        skip: bool = True,
        output_gate: bool = True,
    ):
        super().__init__()
        gate_groups = dim if gate_groups is None else int(gate_groups)
        if gate_groups < 1 or dim % gate_groups:
            raise ValueError(f"gate_groups must divide the hidden size {dim}, got {gate_groups}")
        if proxy_ratio < 1:
            raise ValueError(f"proxy_ratio must be >= 1, got {proxy_ratio}")
        self.dim = dim
        self.chunk = scan_chunk(chunk)
        self.gate_groups = gate_groups
        self.group_lam_u = bool(group_lam_u)
        scale_channels = gate_groups if self.group_lam_u else dim
        self.proxy_dim = max(1, dim // proxy_ratio)
        self.output_gate = output_gate

        self.in_proj = nn.Linear(dim, 2 * dim if output_gate else dim)
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim) if dwconv else None
        self.proxy = nn.Linear(dim, self.proxy_dim)
        # Output rows: [gl | gc | gr], each (4 directions, gate_groups) flattened.
        self.gate_proj = nn.Linear(self.proxy_dim, 3 * NUM_DIRECTIONS * gate_groups)
        self.lam_proj = nn.Linear(self.proxy_dim, NUM_DIRECTIONS * scale_channels)
        self.u_proj = nn.Linear(self.proxy_dim, NUM_DIRECTIONS * scale_channels)
        self.merge = nn.Parameter(torch.empty(NUM_DIRECTIONS, scale_channels))
        self.skip_proj = nn.Linear(self.proxy_dim, dim) if skip else None
        self.out_norm = nn.LayerNorm(dim, eps=1e-6)
        self.out_proj = nn.Linear(dim, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Start as an average of the four directions with each pixel feeding itself in.

        Gate logits start at 0 (wl = wc = wr = 1/3 inside a row), lam and u at 1, the merge at
        1/4. Call it after any generic re-initialisation of the Linear layers (DiT's does one).
        """
        nn.init.zeros_(self.gate_proj.bias)
        nn.init.ones_(self.lam_proj.bias)
        nn.init.ones_(self.u_proj.bias)
        nn.init.constant_(self.merge, 1.0 / NUM_DIRECTIONS)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, chunk={self.chunk}, proxy_dim={self.proxy_dim}, "
                f"gate_groups={self.gate_groups}, group_lam_u={self.group_lam_u}, output_gate={self.output_gate}")

    def scan_operands(self, tokens: torch.Tensor, grid: tuple[int, int]) -> ScanOperands:
        """The scan's inputs (:class:`ScanOperands`) for tokens (B, N, C) on ``grid``.

        Everything runs on (B, N, C) tokens: the projections are plain GEMMs, the depthwise convolution and
        the scan see them as a channels-last map (on the CPU the convolution's backward is several times
        faster on one than on a channel-first map, and the scan takes it without a copy); only the five
        small per-pixel maps are laid out channel-first.
        """
        h, w = check_grid(tokens, grid, "GSPNMixer")
        B, N, C = tokens.shape
        if C != self.dim:
            raise ValueError(f"GSPNMixer: expected {self.dim} channels, got tokens of shape {tuple(tokens.shape)}")
        xz = self.in_proj(tokens)
        x, z = xz.split(C, dim=-1) if self.output_gate else (xz, None)  # split's backward is one cat, no zero fill
        if self.dwconv is not None:
            x = map_to_tokens(self.dwconv(tokens_to_map(x, h, w)))
        x = F.silu(x)
        p = self.proxy(x)
        skip = self.skip_proj(p) if self.skip_proj is not None else None
        x_map = tokens_to_map(x, h, w)  # channels-last: the scan takes tokens as they lie
        D, G = NUM_DIRECTIONS, self.gate_groups
        S = self.merge.shape[1]  # lam's and u's channels: G with group_lam_u, else C
        merge = self.merge.reshape(-1)
        # gl, gc, gr: (4, G) rows each; lam, u: (4, S) rows each; all five from one GEMM.
        weight = torch.cat([self.gate_proj.weight, self.lam_proj.weight, self.u_proj.weight * merge[:, None]])
        bias = torch.cat([self.gate_proj.bias, self.lam_proj.bias, self.u_proj.bias * merge])
        maps = channel_first(F.linear(p, weight, bias), h, w)
        gl, gc, gr, lam, u = maps.split([D * G] * 3 + [D * S] * 2, dim=1)
        gl, gc, gr = (t.view(B, D, G, h, w) for t in (gl, gc, gr))
        lam, u = (t.view(B, D, S, h, w) for t in (lam, u))
        return ScanOperands(x_map, x, gl, gc, gr, lam, u, skip, z)

    def propagate(self, operands: ScanOperands) -> torch.Tensor:
        """sum_d u_d * scan_d(x) (+ skip * x): the four merged propagations, as (B, N, C) tokens."""
        o = operands
        y = ops.gspn_scan(o.x, o.lam, o.gl, o.gc, o.gr, o.u, chunk=self.chunk)
        y = map_to_tokens(y)  # a view of a channels-last y
        if o.skip is not None:
            return torch.addcmul(y, o.skip, o.x_tokens)
        return y.contiguous()

    def output(self, y: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
        """(B, N, C) propagation -> (B, N, C) tokens: LayerNorm, SiLU(z) gate, out_proj."""
        y = self.out_norm(y)
        if z is not None:
            y = y * F.silu(z)
        return self.out_proj(y)

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        operands = self.scan_operands(tokens, grid)
        return self.output(self.propagate(operands), operands.z)
