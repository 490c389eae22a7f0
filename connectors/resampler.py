"""``resampler``: perceiver-style learned queries that cross-attend to the patch features."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Connector, Grid
from .registry import register_connector


class CrossAttention(nn.Module):
    """Multi-head attention of queries (B, T, E) over keys/values (B, N, E)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.o_proj = nn.Linear(dim, dim)

    def forward(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        B, T, E = q.shape
        hd = E // self.num_heads

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(B, -1, self.num_heads, hd).transpose(1, 2)  # (B, H, L, hd)

        out = F.scaled_dot_product_attention(
            heads(self.q_proj(q)), heads(self.k_proj(kv)), heads(self.v_proj(kv))
        )
        return self.o_proj(out.transpose(1, 2).reshape(B, T, E))  # (B, T, E)


class ResamplerLayer(nn.Module):
    """Pre-norm cross-attention then MLP, both residual, on the queries."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: int, eps: float) -> None:
        super().__init__()
        self.norm_q = nn.LayerNorm(dim, eps=eps)
        self.attn = CrossAttention(dim, num_heads)
        self.norm_mlp = nn.LayerNorm(dim, eps=eps)
        self.fc1 = nn.Linear(dim, dim * mlp_ratio)
        self.fc2 = nn.Linear(dim * mlp_ratio, dim)

    def forward(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        q = q + self.attn(self.norm_q(q), kv)
        return q + self.fc2(F.gelu(self.fc1(self.norm_mlp(q))))


@register_connector("resampler")
class ResamplerConnector(Connector):
    """``num_queries`` learned queries of width ``out_dim`` cross-attend (``depth`` layers) to the
    LayerNorm-ed, linearly projected patch features: a fixed number of tokens for any grid."""

    no_decay = ("queries",)

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        *,
        num_queries: int = 64,
        num_heads: int = 8,
        depth: int = 1,
        mlp_ratio: int = 4,
        eps: float = 1e-6,
    ) -> None:
        super().__init__(
            in_dim,
            out_dim,
            num_queries=num_queries,
            num_heads=num_heads,
            depth=depth,
            mlp_ratio=mlp_ratio,
            eps=eps,
        )
        if out_dim % num_heads:
            raise ValueError(f"resampler width {out_dim} is not divisible by num_heads {num_heads}")
        if num_queries < 1 or depth < 1:
            raise ValueError(f"resampler needs num_queries >= 1 and depth >= 1, got {num_queries}, {depth}")
        self.queries = nn.Parameter(torch.randn(num_queries, out_dim) * 0.02)
        self.kv_proj = nn.Linear(in_dim, out_dim, bias=False)
        self.norm_kv = nn.LayerNorm(out_dim, eps=eps)
        self.layers = nn.ModuleList(ResamplerLayer(out_dim, num_heads, mlp_ratio, eps) for _ in range(depth))
        self.norm_out = nn.LayerNorm(out_dim, eps=eps)

    def num_tokens(self, grid: Grid) -> int:
        self.check_grid(grid)
        return self.options["num_queries"]  # not the parameter's shape: ZeRO-3 empties it

    def output_grid(self, grid: Grid) -> None:
        self.check_grid(grid)
        return None  # learned queries: no grid

    def _forward(self, features: torch.Tensor, grid: Grid) -> torch.Tensor:
        kv = self.norm_kv(self.kv_proj(features))  # (B, N, E)
        q = self.queries.to(kv.dtype).unsqueeze(0).expand(kv.shape[0], -1, -1)  # (B, T, E)
        for layer in self.layers:
            q = layer(q, kv)
        return self.norm_out(q)  # (B, T, E)
