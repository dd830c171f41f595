"""The one building block MAC's networks share: pre-norm cross-attention + MLP."""

from __future__ import annotations

import torch
from torch import nn


class CrossAttentionBlock(nn.Module):
    """Queries read from a set of key/value tokens; residual so a block can start near identity.

    Permutation-invariant over the key/value tokens, which is what lets the aggregator treat the
    memory as a set and aggregate it group by group.
    """

    def __init__(self, dim: int, heads: int, kv_dim: int | None = None, mlp_ratio: int = 4) -> None:
        super().__init__()
        kv_dim = kv_dim or dim
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(kv_dim)
        self.attn = nn.MultiheadAttention(dim, heads, kdim=kv_dim, vdim=kv_dim, batch_first=True)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim)
        )

    def forward(
        self, x: torch.Tensor, kv: torch.Tensor, kv_padding: torch.Tensor | None = None, residual: bool = True
    ) -> torch.Tensor:
        """``x [B, Q, dim]``, ``kv [B, K, kv_dim]``, ``kv_padding [B, K]`` True where padded.
        ``residual=False``: the output is only what ``x`` read from ``kv`` (``x`` picks where)."""
        kv = self.norm_kv(kv)
        attended, _ = self.attn(self.norm_q(x), kv, kv, key_padding_mask=kv_padding, need_weights=False)
        x = x + attended if residual else attended
        return x + self.mlp(self.norm_mlp(x))
