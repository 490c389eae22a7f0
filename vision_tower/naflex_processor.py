"""SigLIP 2 NaFlex preprocessing, equal to transformers' ``Siglip2ImageProcessor`` (and its ``Pil`` twin).

Each image keeps its aspect ratio: it is resized (bilinear by default) to the largest size whose
sides are multiples of ``patch_size`` and whose patch count is at most ``max_num_patches``, cut into
patches flattened in (row, column, channel) order, and padded with zero patches to
``max_num_patches``. Rescale and normalize follow :mod:`.backends` (``backend="torchvision"`` or
``"pil"``, default as :class:`ImageProcessor`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import torch
from einops import rearrange

from . import backends
from .processor import NAFLEX_TYPES, Preprocessing, common_kwargs


class NaFlexBatch(NamedTuple):
    """``pixel_values`` (B, N, p*p*3) float32 patches, ``attention_mask`` (B, N) int32 (1 = real patch),
    ``spatial_shapes`` (B, 2) int64 (h, w) patch grid per image; N = ``max_num_patches``."""

    pixel_values: torch.Tensor
    attention_mask: torch.Tensor
    spatial_shapes: torch.Tensor


def size_for_patches(height: int, width: int, patch_size: int, max_num_patches: int) -> tuple[int, int]:
    """(h, w) in pixels, multiples of ``patch_size``, aspect kept, at most ``max_num_patches`` patches.

    The same bisection over the scale as transformers' ``get_image_size_for_max_num_patches``
    (to 1e-5), so that both pick the same size."""

    def side(scale: float, size: int) -> int:
        return max(patch_size, math.ceil(size * scale / patch_size) * patch_size)

    eps = 1e-5
    low, high = eps / 10, 100.0
    while high - low >= eps:
        scale = (low + high) / 2
        if (side(scale, height) / patch_size) * (side(scale, width) / patch_size) <= max_num_patches:
            low = scale
        else:
            high = scale
    return side(low, height), side(low, width)


@dataclasses.dataclass
class NaFlexImageProcessor(Preprocessing):
    """SigLIP 2 NaFlex preprocessing; calling it on one image or a list gives a :class:`NaFlexBatch`."""

    patch_size: int = 16
    max_num_patches: int = 256
    resample: str | int = dataclasses.field(default="bilinear", kw_only=True)

    def __post_init__(self) -> None:
        self.backend = backends.check_backend(self.backend)
        if self.patch_size < 1 or self.max_num_patches < 1:
            raise ValueError(
                f"patch_size {self.patch_size} and max_num_patches {self.max_num_patches} must be >= 1"
            )
        self._check_pixels()
        self._check_filter()

    def __call__(self, images: Any) -> NaFlexBatch:
        rows, masks, shapes = zip(*(self._patches(image) for image in self._batch(images)))
        return NaFlexBatch(torch.stack(rows), torch.stack(masks), torch.tensor(shapes, dtype=torch.long))

    preprocess = __call__

    def _patches(self, image: Any) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """One image -> (N, p*p*3) padded patches, (N,) mask, (h, w) patch grid."""
        rgb = self._rgb(image)  # (H, W, 3) uint8
        p = self.patch_size
        size = size_for_patches(*rgb.shape[:2], p, self.max_num_patches) if self.do_resize else None
        x = self._float_pixels(rgb, size)  # (3, H, W) float32
        h, w = x.shape[1] // p, x.shape[2] // p
        if h * w > self.max_num_patches:
            raise ValueError(
                f"{h}x{w} patches exceed max_num_patches={self.max_num_patches} (do_resize=False)"
            )
        x = x[:, : h * p, : w * p]
        patches = rearrange(x, "c (h p1) (w p2) -> (h w) (p1 p2 c)", p1=p, p2=p)  # (h*w, p*p*3)
        padded = patches.new_zeros(self.max_num_patches, patches.shape[1])
        padded[: h * w] = patches
        mask = torch.zeros(self.max_num_patches, dtype=torch.int32)
        mask[: h * w] = 1
        return padded, mask, (h, w)

    # ------------------------------------------------------------------ config files
    def to_dict(self) -> dict[str, Any]:
        """The ``preprocessor_config.json`` content, in transformers' Siglip2ImageProcessor fields."""
        return self._config_fields(
            "Siglip2ImageProcessor", max_num_patches=self.max_num_patches, patch_size=self.patch_size
        )

    @classmethod
    def from_dict(cls, config: dict[str, Any], **overrides: Any) -> NaFlexImageProcessor:
        kind = config.get("image_processor_type", NAFLEX_TYPES[0])
        if kind not in NAFLEX_TYPES and "max_num_patches" not in config:
            raise ValueError(
                f"{kind} is fixed-resolution preprocessing: load it with vision_tower.ImageProcessor"
            )
        kwargs = common_kwargs(config)
        kwargs.update(
            {k: int(config[k]) for k in ("patch_size", "max_num_patches") if config.get(k) is not None}
        )
        return cls._with_overrides(kwargs, overrides)
