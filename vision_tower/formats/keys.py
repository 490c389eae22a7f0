"""Key-renaming helpers shared by the format modules."""

from __future__ import annotations

import re
from typing import Any

import torch

# a block of one of our towers: (index, rest of the key)
OUR_BLOCK = re.compile(r"^encoder\.blocks\.(\d+)\.(.+)$")


def rename(key: str, table: list[tuple[str, str]], reverse: bool = False) -> str | None:
    """``key`` with its module path renamed by ``table`` ((theirs, ours) pairs; ours -> theirs if
    ``reverse``); ``None`` when no entry matches. Suffixes such as ``.weight`` are kept."""
    for theirs, ours in table:
        src, dst = (ours, theirs) if reverse else (theirs, ours)
        if key == src or key.startswith(src + "."):
            return dst + key[len(src) :]
    return None


def part(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries under ``prefix``, with it removed."""
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


def depth_of(sd: dict[str, torch.Tensor]) -> int:
    """The number of blocks in one tower's state dict in our layout (no tower prefix)."""
    return 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.blocks."))


def text_shape(sd: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The text-config fields a text tower's state dict in our layout (no prefix) gives by its shapes."""
    vocab, width = sd["token_embed.weight"].shape
    return dict(
        vocab_size=vocab,
        hidden_size=width,
        intermediate_size=sd["encoder.blocks.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=depth_of(sd),
        max_position_embeddings=sd["pos_embed"].shape[0],
        projection_size=sd["head.weight"].shape[0],
    )
