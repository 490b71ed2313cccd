"""Multi-head self-attention with facebookresearch/DiT's (timm's) parameter names, through SDPA."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .mixer import BlockContext, TokenMixer, register_mixer
from .token_grid import check_grid


@register_mixer("attention")
class Attention(TokenMixer):
    """Self-attention over all tokens; keys ``qkv`` and ``proj`` as in DiT's checkpoints.

    The grid is accepted (and checked) only so that every token mixer has the same call
    signature ``mixer(tokens, grid)``; attention itself is permutation-equivariant.
    """

    block_attribute = "attn"  # DiT's key: the official checkpoints load unchanged
    wants_pos_embed = True  # attention is permutation-equivariant: DiT adds the sin-cos embedding

    @classmethod
    def for_block(cls, context: BlockContext) -> "Attention":
        return cls(context.hidden_size, num_heads=context.num_heads, qkv_bias=True)

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden_size {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        check_grid(x, grid, "Attention")
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)  # scale head_dim ** -0.5, as DiT
        return self.proj(x.transpose(1, 2).reshape(B, N, C))
