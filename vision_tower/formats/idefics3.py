"""The image tower of Idefics3 and SmolVLM checkpoints, read by the transformers layout.

``Idefics3VisionTransformer`` (and SmolVLM's copy of it) is SigLIP's ViT without the pooling head, with
the same keys (``model.vision_model.`` in ``Idefics3ForConditionalGeneration``, in 4.x and 5.x saves
alike). It differs in one place: the position lookup. Built for a padded batch of images of any size, it
gives each valid patch of an ``h x w`` grid the row ``bucket(i / h) * s + bucket(j / w)`` of its ``s x s``
table (``s = image_size // patch_size``), where ``bucket`` finds the interval of ``arange(1/s, 1, 1/s)``
a float32 fraction falls in. For a full image at the checkpoint's size (``h = w = s``, no padding: the
tiles and the global image of its image splitting) this should be the identity, but float32 rounding
moves some rows to the one before: with ``s`` = 19, 25, 29, 31, 38, 40, 41, 43, 47, 49, 50, ... a few rows
or columns read their neighbour's embedding and some table rows are never read. The released sizes
(``s`` = 26 for Idefics3's 364 px, 27 for 384 px, 32 for SmolVLM's 512 px) are the identity.

:func:`full_grid_table` turns that lookup into the plain learned table a SigLIP tower adds, so the tower
gives Idefics3's features exactly at the checkpoint's image size. What a plain table cannot hold: images
padded within a batch (``patch_attention_mask`` with invalid patches: this tower always sees whole
images), and other image sizes, where Idefics3 reads the table through the same bucketing (the row at or
before ``i * s / n``) while ``image_size=`` resizes the table like any SigLIP table (bicubic).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..checkpoint import CheckpointError

# config.json model types of the whole model and of its vision_config
HOSTS = ("idefics3", "smolvlm")
VISION_MODEL_TYPES = ("idefics3_vision", "smolvlm_vision")

# Idefics3VisionConfig's and SmolVLMVisionConfig's defaults where they differ from SiglipVisionConfig's: a
# config.json leaves out what equals its class default (released SmolVLM files give no intermediate_size)
DEFAULTS = {
    "hidden_size": 1152,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 16,
    "image_size": 224,
    "patch_size": 32,
}
# keys released SmolVLM/Idefics3 vision configs carry that the transformers classes store and never read
IGNORED = ("max_image_size", "size", "use_base_siglip")


def holds(config: dict[str, Any] | None) -> bool:
    """Is ``config`` (a config.json) that of an Idefics3 or SmolVLM model, or of its vision transformer?"""
    if not config:
        return False
    vision = config.get("vision_config") or {}
    return config.get("model_type") in (*HOSTS, *VISION_MODEL_TYPES) or (
        isinstance(vision, dict) and vision.get("model_type") in VISION_MODEL_TYPES
    )


def vision_config(fields: dict[str, Any]) -> dict[str, Any]:
    """The transformers vision config fields of an Idefics3/SmolVLM tower, with its class defaults filled
    in and the image-processor keys it ignores dropped (``model_type`` becomes SigLIP's)."""
    kept = {k: v for k, v in fields.items() if k not in IGNORED}
    return {**DEFAULTS, **kept, "model_type": "siglip_vision_model"}


def position_rows(table_side: int, grid_side: int) -> torch.Tensor:
    """``(grid_side,)`` the table row (and column) Idefics3 reads for each patch row (column) of a full
    ``grid_side``-patch image, with transformers' float32 arithmetic (``Idefics3VisionEmbeddings``)."""
    boundaries = torch.arange(1 / table_side, 1.0, 1 / table_side, dtype=torch.float32)
    step = 1.0 / torch.tensor([grid_side])  # (1,) float32, as transformers' 1.0 / nb_patches_h
    fractions = torch.arange(grid_side, dtype=torch.float32) * step  # (grid_side,)
    fractions = fractions.clamp(max=1.0 - 1e-6)
    return torch.bucketize(fractions, boundaries, right=True)


def full_grid_table(table: torch.Tensor, source: str) -> torch.Tensor:
    """``(s*s, D) -> (s*s, D)``: the position embedding each patch of a full image at the checkpoint's size
    gets, row-major, i.e. the table a SigLIP tower adds to give Idefics3's features."""
    side = math.isqrt(table.shape[0])
    if side * side != table.shape[0]:
        raise CheckpointError(
            f"{source}: the Idefics3 position table has {table.shape[0]} rows, not a square grid of positions"
        )
    rows = position_rows(side, side)  # (s,)
    ids = (rows[:, None] * side + rows[None, :]).reshape(-1)  # (s*s,)
    return table[ids]
