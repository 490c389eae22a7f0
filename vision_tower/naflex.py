"""The SigLIP 2 NaFlex image tower: one image per row at its own aspect ratio and patch grid.

Inputs come patchified and padded to a common length (see :class:`NaFlexImageProcessor`):
``pixel_values`` (B, N, p*p*C), ``spatial_shapes`` (B, 2) with each image's (h, w) patch grid, and
``attention_mask`` (B, N), 1 for the h*w real patches at the front of each row. The learned square
position table is resized to every image's grid (bilinear, antialiased, as big_vision and
transformers' ``Siglip2VisionModel``); padding patches are never attended to.
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import CheckpointError, build_and_load
from .config import NaFlexVisionConfig
from .loading import Weights, read_vision_weights
from .saving import DEFAULT_FORMAT, write_vision_weights
from .vision import ImageTowerBase, add_trunk


class NaFlexOutput(NamedTuple):
    """``patch_features`` (B, N, D) of ``feature_layer``, padding rows included (``attention_mask`` says
    which are real); ``spatial_shapes`` (B, 2) each image's (h, w) patch grid, its h*w tokens first in
    row-major order; ``pooled`` (B, D) from the head over real tokens, or ``None``."""

    patch_features: torch.Tensor
    spatial_shapes: torch.Tensor
    attention_mask: torch.Tensor
    pooled: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None

    @property
    def grids(self) -> list[tuple[int, int]]:
        """Each image's (h, w) patch grid."""
        return [(int(h), int(w)) for h, w in self.spatial_shapes.tolist()]

    def per_image(self) -> list[torch.Tensor]:
        """Each image's real tokens, (h*w, D), in row-major order."""
        return [f[: h * w] for f, (h, w) in zip(self.patch_features, self.grids)]


def resize_positions(table: torch.Tensor, spatial_shapes: torch.Tensor, length: int) -> torch.Tensor:
    """A square (S*S, D) position table resized to each image's (h, w) grid, (B, length, D).

    Bilinear with antialiasing and ``align_corners=False``, computed in float32; positions past
    h*w (padding) repeat the first one, as transformers' ``Siglip2VisionEmbeddings`` does."""
    n, dim = table.shape
    side = math.isqrt(n)
    grid = table.reshape(1, side, side, dim).permute(0, 3, 1, 2).float()  # (1, D, S, S)
    out = table.new_empty(len(spatial_shapes), length, dim)
    cache: dict[tuple[int, int], torch.Tensor] = {}
    for i, (h, w) in enumerate(spatial_shapes.tolist()):
        if h * w > length or h < 1 or w < 1:
            raise ValueError(f"image {i}: a {h}x{w} patch grid does not fit {length} positions")
        if (h, w) not in cache:
            resized = F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
            cache[(h, w)] = resized.reshape(dim, h * w).t().to(table.dtype)  # (h*w, D)
        out[i, : h * w] = cache[(h, w)]
        out[i, h * w :] = cache[(h, w)][0]
    return out


class NaFlexVisionTower(ImageTowerBase):
    """SigLIP 2 NaFlex ViT: linear patch embedding, per-image resized positions, masked pre-norm blocks,
    post-norm and an optional masked attention-pooling head.

    ``feature_layer`` has :class:`VisionTower`'s meaning: -1 is the final post-layernorm output,
    k the raw output of block k (0 = embeddings, -2 = the block before last)."""

    def __init__(self, config: NaFlexVisionConfig, *, feature_layer: int = -1) -> None:
        super().__init__()
        self.config = config
        dim = config.hidden_size
        self.patch_embed = nn.Linear(config.patch_dim, dim)
        self.pos_embed = nn.Parameter(torch.zeros(config.num_patches, dim))
        add_trunk(self, config)
        self.feature_layer = feature_layer
        self.reset_parameters()

    def embed(self, pixel_values: torch.Tensor, spatial_shapes: torch.Tensor) -> torch.Tensor:
        """(B, N, p*p*C) patches -> (B, N, D) patch + resized position embeddings."""
        x = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype))  # (B, N, D)
        return x + resize_positions(self.pos_embed, spatial_shapes, x.shape[1])

    def forward(
        self,
        pixel_values: torch.Tensor,
        spatial_shapes: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        output_hidden_states: bool = False,
    ) -> NaFlexOutput:
        """Patchified pixels (B, N, p*p*C), grids (B, 2), mask (B, N) -> :class:`NaFlexOutput`. The mask and
        grids may stay on the CPU where the processor made them: the mask is moved beside the pixels."""
        B, N, P = pixel_values.shape
        if P != self.config.patch_dim:
            raise ValueError(
                f"patches of {P} values given to a tower of {self.config.patch_size}px patches "
                f"({self.config.patch_dim} values each): use NaFlexImageProcessor(patch_size="
                f"{self.config.patch_size})"
            )
        if attention_mask is None:
            attention_mask = torch.ones(B, N, dtype=torch.long, device=pixel_values.device)
        attention_mask = attention_mask.to(pixel_values.device)  # the processor's stays on the CPU
        keys = attention_mask.bool()  # (B, N): a boolean mask, whatever the model's dtype
        x = self.embed(pixel_values, spatial_shapes)  # (B, N, D)
        mask = keys[:, None, None, :]  # (B, 1, 1, N): padding is never a key
        features, pooled, hidden = self.run_trunk(
            x, attn_mask=mask, key_mask=keys, output_hidden_states=output_hidden_states
        )
        return NaFlexOutput(features, spatial_shapes, attention_mask, pooled, hidden)

    # ----------------------------------------------------------------- checkpoints
    @classmethod
    def from_pretrained(
        cls,
        src: str | os.PathLike,
        *,
        feature_layer: int = -1,
        use_head: bool | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
    ) -> NaFlexVisionTower:
        """Load a NaFlex image tower (transformers ``Siglip2VisionModel`` / ``Siglip2Model`` layout or a
        big_vision NaFlex ``.npz``) from a folder, file or hub repo id, strictly."""
        weights = read_vision_weights(src, use_head=use_head, revision=revision, cache_dir=cache_dir)
        return cls.from_weights(weights, feature_layer=feature_layer, dtype=dtype).to(device=device)

    @classmethod
    def from_weights(
        cls, weights: Weights, *, feature_layer: int = -1, dtype: torch.dtype | None = None
    ) -> NaFlexVisionTower:
        if not isinstance(weights.config, NaFlexVisionConfig):
            raise CheckpointError(
                f"{weights.source} is a fixed-resolution SigLIP image tower, not a NaFlex one: "
                f"load it with vision_tower.VisionTower"
            )
        return build_and_load(
            lambda: cls(weights.config, feature_layer=feature_layer),
            weights.state_dict,
            source=weights.source,
            ignored=weights.ignored,
            dtype=dtype,
        )

    def save_pretrained(self, out_dir: str | os.PathLike, format: str = DEFAULT_FORMAT) -> None:
        """Write transformers' ``Siglip2VisionModel`` layout (config.json + model.safetensors); the only
        ``format`` for NaFlex towers is ``"transformers"``."""
        write_vision_weights(self.config, self.state_dict(), out_dir, format=format)
