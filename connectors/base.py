"""What every connector is: tower patch features on a token grid in, decoder embeddings out."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from .registry import ConnectorConfig

Grid = tuple[int, int]


class Connector(nn.Module):
    """Maps patch features ``(B, N, in_dim)`` laid out row-major on a ``grid`` of (h, w) tokens (the
    tower's ``TowerOutput.grid``, N = h * w) to ``(B, num_tokens(grid), out_dim)`` decoder embeddings.

    Subclasses set ``name`` (by registering), implement ``_forward`` and, if they change the token
    count or need a particular grid, ``num_tokens`` and ``_grid_problem``. ``no_decay`` lists
    parameter names (besides biases and norms, which every optimizer setup skips) that should not get
    weight decay, such as learned queries.
    """

    name: ClassVar[str] = ""
    no_decay: ClassVar[tuple[str, ...]] = ()

    def no_weight_decay(self) -> set[str]:
        """``no_decay`` as the module protocol the optimizer setup reads (as the towers')."""
        return set(self.no_decay)

    def __init__(self, in_dim: int, out_dim: int, **options: Any) -> None:
        super().__init__()
        for what, value in (("in_dim", in_dim), ("out_dim", out_dim)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"connector {self.name!r}: {what} must be a positive int, got {value!r}")
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.options = options

    @property
    def config(self) -> ConnectorConfig:
        return ConnectorConfig(self.name, self.in_dim, self.out_dim, dict(self.options))

    # ---------------------------------------------------------------- grid rules
    def _grid_problem(self, grid: Grid) -> str | None:
        """Why this connector cannot take ``grid`` (a sentence with the numbers), or None."""
        return None

    def check_grid(self, grid: Grid) -> None:
        """Raise ``ValueError`` naming the numbers if ``grid`` cannot be taken."""
        h, w = grid
        if h < 1 or w < 1:
            raise ValueError(f"connector {self.name!r}: empty token grid {h}x{w}")
        problem = self._grid_problem((int(h), int(w)))
        if problem:
            raise ValueError(f"connector {self.name!r} cannot take a {h}x{w} token grid: {problem}")

    def num_tokens(self, grid: Grid) -> int:
        """How many embeddings one image of ``grid`` tokens becomes (checks the grid)."""
        self.check_grid(grid)
        return grid[0] * grid[1]

    def output_grid(self, grid: Grid) -> Grid | None:
        """The (rows, cols) grid the ``num_tokens(grid)`` output tokens lie on, row-major (image layouts
        that re-assemble tiles need it), or None when they lie on none (learned queries)."""
        self.check_grid(grid)
        return (int(grid[0]), int(grid[1]))

    # ---------------------------------------------------------------- forward
    def forward(self, features: torch.Tensor, grid: Grid) -> torch.Tensor:
        """(B, N, in_dim) features on ``grid`` -> (B, num_tokens(grid), out_dim)."""
        grid = (int(grid[0]), int(grid[1]))
        self.check_grid(grid)
        if features.ndim != 3 or features.shape[1] != grid[0] * grid[1] or features.shape[2] != self.in_dim:
            raise ValueError(
                f"connector {self.name!r} expects features (B, {grid[0]}*{grid[1]}={grid[0] * grid[1]}, "
                f"{self.in_dim}) for a {grid[0]}x{grid[1]} grid, got {tuple(features.shape)}"
            )
        return self._forward(features, grid)

    def _forward(self, features: torch.Tensor, grid: Grid) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"{self.name}: {self.in_dim} -> {self.out_dim}" + (f", {opts}" if opts else "")
