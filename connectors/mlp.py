"""Projections of each token on its own: ``linear`` (PaliGemma) and ``mlp`` / ``mlp2x_gelu`` (LLaVA-1.5)."""

from __future__ import annotations

import torch
from torch import nn

from .base import Connector, Grid
from .registry import register_connector

# activations by their transformers config names (``projector_hidden_act``)
ACTIVATIONS = {
    "gelu": lambda: nn.GELU(),
    "gelu_pytorch_tanh": lambda: nn.GELU(approximate="tanh"),
    "silu": lambda: nn.SiLU(),
    "relu": lambda: nn.ReLU(),
}


def make_mlp(in_dim: int, hidden_dim: int, out_dim: int, depth: int, act: str, bias: bool) -> nn.Sequential:
    """``depth`` linear layers with ``act`` between them (depth 1: a single linear layer)."""
    if depth < 1:
        raise ValueError(f"an MLP needs depth >= 1, got {depth}")
    if act not in ACTIVATIONS:
        raise ValueError(f"unknown activation {act!r}; known: {sorted(ACTIVATIONS)}")
    dims = [in_dim] + [hidden_dim] * (depth - 1) + [out_dim]
    layers: list[nn.Module] = []
    for i in range(depth):
        if i:
            layers.append(ACTIVATIONS[act]())
        layers.append(nn.Linear(dims[i], dims[i + 1], bias=bias))
    return nn.Sequential(*layers)


@register_connector("linear")
class LinearConnector(Connector):
    """One linear map per token: PaliGemma's projector."""

    def __init__(self, in_dim: int, out_dim: int, *, bias: bool = True) -> None:
        super().__init__(in_dim, out_dim, bias=bias)
        self.proj = nn.Linear(in_dim, out_dim, bias=bias)

    def _forward(self, features: torch.Tensor, grid: Grid) -> torch.Tensor:
        return self.proj(features)  # (B, N, out_dim)


@register_connector("mlp", aliases={"mlp2x_gelu": {"depth": 2, "act": "gelu"}})
class MLPConnector(Connector):
    """``depth`` linear layers with ``act`` between them, per token; hidden width ``out_dim`` unless
    ``hidden_dim`` is given. ``mlp2x_gelu`` is LLaVA-1.5's projector: Linear, GELU, Linear."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        *,
        depth: int = 2,
        act: str = "gelu",
        hidden_dim: int | None = None,
        bias: bool = True,
    ) -> None:
        super().__init__(in_dim, out_dim, depth=depth, act=act, hidden_dim=hidden_dim, bias=bias)
        self.mlp = make_mlp(in_dim, hidden_dim or out_dim, out_dim, depth, act, bias)

    def _forward(self, features: torch.Tensor, grid: Grid) -> torch.Tensor:
        return self.mlp(features)  # (B, N, out_dim)
