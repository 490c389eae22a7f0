"""Space-to-depth token merging: ``pixel_shuffle`` (Idefics3 / SmolVLM) and ``patch_merger`` (Qwen2-VL)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from einops import rearrange
from torch import nn

from .base import Connector, Grid
from .mlp import make_mlp
from .registry import register_connector


def space_to_depth(features: torch.Tensor, grid: Grid, factor: int) -> torch.Tensor:
    """(B, h*w, D) row-major tokens -> (B, h/s * w/s, s*s*D): each s x s block of neighbours becomes one
    token, channels ordered (row in block, column in block, channel) as Idefics3's pixel shuffle and
    Qwen2-VL's merger see them."""
    h, w = grid
    return rearrange(
        features, "b (h i w j) d -> b (h w) (i j d)", h=h // factor, i=factor, w=w // factor, j=factor
    )


class BlockMergingConnector(Connector):
    """A connector that merges each s x s block of neighbouring tokens into one, s being its option
    ``block_option``: grid sides must be multiples of s, and h*w / s^2 tokens come out."""

    block_option: ClassVar[str] = ""
    merging: ClassVar[str] = ""  # what the error messages call the merge

    def __init__(self, in_dim: int, out_dim: int, **options: Any) -> None:
        super().__init__(in_dim, out_dim, **options)
        if options[self.block_option] < 1:
            raise ValueError(
                f"{self.name} {self.block_option} must be >= 1, got {options[self.block_option]}"
            )

    @property
    def block(self) -> int:
        return self.options[self.block_option]

    def _grid_problem(self, grid: Grid) -> str | None:
        h, w, s = grid[0], grid[1], self.block
        if h % s == 0 and w % s == 0:
            return None
        side = s * max(1, round(max(h, w) / s))
        return (
            f"{self.merging} by {s} needs both grid sides divisible by {s}; resize the tower so that "
            f"image_size / patch_size is a multiple of {s} (e.g. a {side}x{side} grid)"
        )

    def num_tokens(self, grid: Grid) -> int:
        self.check_grid(grid)
        return grid[0] * grid[1] // self.block**2

    def output_grid(self, grid: Grid) -> Grid:
        self.check_grid(grid)
        return grid[0] // self.block, grid[1] // self.block


@register_connector("pixel_shuffle")
class PixelShuffleConnector(BlockMergingConnector):
    """Merge each ``factor`` x ``factor`` block of tokens into one (space to depth, Idefics3's channel
    order), then project: one bias-free linear layer by default (Idefics3's ``modality_projection``),
    or an MLP with ``depth`` > 1. Emits h*w / factor^2 tokens."""

    block_option = "factor"
    merging = "pixel shuffle"

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        *,
        factor: int = 2,
        depth: int = 1,
        act: str = "gelu",
        hidden_dim: int | None = None,
        bias: bool = False,
    ) -> None:
        super().__init__(
            in_dim, out_dim, factor=factor, depth=depth, act=act, hidden_dim=hidden_dim, bias=bias
        )
        self.factor = factor
        self.proj = make_mlp(in_dim * factor * factor, hidden_dim or out_dim, out_dim, depth, act, bias)

    def _forward(self, features: torch.Tensor, grid: Grid) -> torch.Tensor:
        merged = space_to_depth(features, grid, self.factor)  # (B, N/s^2, s^2 * D)
        return self.proj(merged)  # (B, N/s^2, out_dim)


@register_connector("patch_merger")
class PatchMergerConnector(BlockMergingConnector):
    """Qwen2-VL's merger: LayerNorm per token, merge each ``merge_size`` x ``merge_size`` block into
    one token, then Linear, GELU, Linear (hidden width in_dim * merge_size^2)."""

    block_option = "merge_size"
    merging = "patch merging"

    def __init__(self, in_dim: int, out_dim: int, *, merge_size: int = 2, eps: float = 1e-6) -> None:
        super().__init__(in_dim, out_dim, merge_size=merge_size, eps=eps)
        self.merge_size = merge_size
        hidden = in_dim * merge_size * merge_size
        self.norm = nn.LayerNorm(in_dim, eps=eps)
        self.mlp = make_mlp(hidden, hidden, out_dim, depth=2, act="gelu", bias=True)

    def _forward(self, features: torch.Tensor, grid: Grid) -> torch.Tensor:
        merged = space_to_depth(self.norm(features), grid, self.merge_size)  # (B, N/m^2, m^2 * D)
        return self.mlp(merged)  # (B, N/m^2, out_dim)
