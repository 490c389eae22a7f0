"""Image-text pairs for SigLIP pretraining and evaluation: one image and its caption per sample,
tokenized to a fixed length, batched as ``{"pixel_values": (B, 3, H, W), "input_ids": (B, L),
"caption", "__key__"}``.

Shards are tar files of ``<key>.{jpg,jpeg,png,webp}`` + ``<key>.txt`` (or ``<key>.json`` with a
``caption``/``text`` field). Captions that the tokenizer cuts at its ``max_length`` are kept but
counted (``ShardLoader.truncated_captions``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from .shards import ShardSpec, SkipSample, default_decode_image, read_caption, read_image
from .stream import ShardDataset, shard_dataset


def squeeze_one(x: torch.Tensor, ndim: int, what: str) -> torch.Tensor:
    """Accept a leading batch dim of 1 (ImageProcessor / Tokenizer on one item)."""
    if x.dim() == ndim + 1 and x.shape[0] == 1:
        x = x[0]
    if x.dim() != ndim:
        raise ValueError(f"{what} must return a tensor with {ndim} dims, got shape {tuple(x.shape)}")
    return x


class TokenizeOne:
    """Turns a batch tokenizer (list[str] -> (B, L)) into a text_transform (str -> (L,)).

    Truncation is reported (`is_truncated`) when the tokenizer has an ``is_truncated(text)`` method,
    as `vision_tower.Tokenizer` does.
    """

    def __init__(self, tokenizer: Callable[[list[str]], torch.Tensor]) -> None:
        self.tokenizer = tokenizer

    def __call__(self, text: str) -> torch.Tensor:
        return self.tokenizer([text])[0]  # (L,)

    def is_truncated(self, text: str) -> bool | None:
        """Was ``text`` cut to the tokenizer's length? None when the tokenizer cannot tell."""
        check = getattr(self.tokenizer, "is_truncated", None)
        return None if check is None else bool(check(text))


@dataclass
class PairItem:
    key: str
    pixels: torch.Tensor  # (3, H, W)
    ids: torch.Tensor  # (L,)
    text: str  # the caption
    truncated: bool = False


class PairBuilder:
    """Decode, validate and transform one image-caption sample; batches of equal-length token rows."""

    truncation_advice = (
        "they are longer than the tokenizer's max_length: train a tokenizer that fits them "
        "(vision-tower train-tokenizer) or raise max_length"
    )

    def __init__(
        self,
        image_transform: Callable[[Image.Image], torch.Tensor],
        text_transform: Callable[[str], torch.Tensor],
        decode_image: Callable[[bytes], Image.Image] = default_decode_image,
    ) -> None:
        self.image_transform, self.text_transform = image_transform, text_transform
        self.decode_image = decode_image

    def build(self, sample: dict[str, Any]) -> PairItem:
        caption = read_caption(sample)
        image = read_image(sample, self.decode_image)
        try:
            pixels = squeeze_one(self.image_transform(image), 3, "image_transform")  # (3, H, W)
            ids = squeeze_one(
                torch.as_tensor(self.text_transform(caption)),
                1,
                "text_transform (str -> (L,); wrap a batch tokenizer in TokenizeOne)",
            )  # (L,)
            check = getattr(self.text_transform, "is_truncated", None)
            truncated = bool(check(caption)) if check is not None else False
        except Exception as exn:
            raise SkipSample("transform", repr(exn)) from exn
        return PairItem(sample["__key__"], pixels, ids, caption, truncated)

    def collate(self, items: list[PairItem]) -> dict[str, Any]:
        lengths = {tuple(it.ids.shape) for it in items}
        if len(lengths) > 1:
            raise ValueError(
                f"text_transform gave token sequences of lengths {sorted(lengths)}; "
                "pad to a fixed length (max_length padding)"
            )
        return {
            "pixel_values": torch.stack([it.pixels for it in items]),  # (B, 3, H, W)
            "input_ids": torch.stack([it.ids for it in items]).long(),  # (B, L)
            "caption": [it.text for it in items],
            "__key__": [it.key for it in items],
        }


def build_dataset(
    shards: ShardSpec,
    *,
    image_transform: Callable[[Image.Image], torch.Tensor],
    text_transform: Callable[[str], torch.Tensor],
    decode_image: Callable[[bytes], Image.Image] = default_decode_image,
    **options: Any,
) -> ShardDataset:
    """The image-caption stream over `shards` (brace pattern, list or folder of .tar).

    `image_transform`: PIL RGB image -> (3, H, W) float tensor (an `ImageProcessor` works, its
    (1, 3, H, W) is squeezed); `text_transform`: str -> (L,) token ids (`TokenizeOne(tokenizer)`).
    `options` (`batch_size`, `seed`, `rank`, `world_size`, `resampled`, `shuffle`, `shuffle_buffer`,
    `epoch`, `drop_last`, `max_consecutive_skips`) are those of :func:`training.data.stream.shard_dataset`.
    """
    return shard_dataset(shards, PairBuilder(image_transform, text_transform, decode_image), **options)
