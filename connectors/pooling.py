"""``avg_pool``: Gemma 3's projector (average-pool the token grid to k x k, RMSNorm, linear)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Connector, Grid
from .registry import register_connector


class OffsetRMSNorm(nn.Module):
    """Gemma's RMSNorm: ``x / rms(x) * (1 + weight)`` computed in fp32, weight starting at zero."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * (1.0 + self.weight.float())).type_as(x)


@register_connector("avg_pool")
class AvgPoolConnector(Connector):
    """Average-pool the (h, w) token grid to ``tokens_per_side`` x ``tokens_per_side`` tokens, Gemma's
    RMSNorm, then a bias-free linear map (Gemma 3: 64x64 patches -> 16x16 = 256 tokens)."""

    def __init__(self, in_dim: int, out_dim: int, *, tokens_per_side: int = 16, eps: float = 1e-6) -> None:
        super().__init__(in_dim, out_dim, tokens_per_side=tokens_per_side, eps=eps)
        if tokens_per_side < 1:
            raise ValueError(f"avg_pool tokens_per_side must be >= 1, got {tokens_per_side}")
        self.tokens_per_side = tokens_per_side
        self.norm = OffsetRMSNorm(in_dim, eps)
        self.proj = nn.Linear(in_dim, out_dim, bias=False)

    def _grid_problem(self, grid: Grid) -> str | None:
        k = self.tokens_per_side
        if grid[0] % k or grid[1] % k:
            return (
                f"average pooling to {k}x{k} needs both grid sides to be multiples of {k} "
                f"(whole pooling windows); resize the tower or choose tokens_per_side dividing {grid[0]} and "
                f"{grid[1]}"
            )
        return None

    def num_tokens(self, grid: Grid) -> int:
        self.check_grid(grid)
        return self.tokens_per_side**2

    def output_grid(self, grid: Grid) -> Grid:
        self.check_grid(grid)
        return self.tokens_per_side, self.tokens_per_side

    def _forward(self, features: torch.Tensor, grid: Grid) -> torch.Tensor:
        B, _, D = features.shape
        k = self.tokens_per_side
        x = features.transpose(1, 2).reshape(B, D, grid[0], grid[1])  # (B, D, h, w)
        x = F.avg_pool2d(x, kernel_size=(grid[0] // k, grid[1] // k))  # (B, D, k, k)
        x = x.flatten(2).transpose(1, 2)  # (B, k*k, D)
        return self.proj(self.norm(x))  # (B, k*k, out_dim)
