"""Packing: several samples in one row of up to ``max_length`` tokens, instead of one sample per row padded
to the batch's longest. The stream (:class:`~training.data.stream.ShardDataset`) fills a batch's rows first
fit, in the order the samples come, and the builder collates the rows (:func:`collate_packed`).

A packed row carries ``position_ids`` that restart at 0 at each sample: the VLM reads them as transformers'
packed-sequence format, so a token attends only within its own sample, by that sample's own mask (its
prefix, its images), and sees the same positions as in a row of its own. Each sample keeps its token types
and targets; its first token is never a target (in a row of its own nothing predicts it), so the loss and
its gradients equal those of the same samples unpacked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from connectors.inputs import IGNORE_INDEX


@dataclass(frozen=True)
class RowPacker:
    """Which items may share a row: together at most ``max_length`` tokens and, with ``max_images`` set, at
    most that many images (a sample with more images than that takes a row of its own)."""

    max_length: int
    max_images: int | None = None

    def __post_init__(self) -> None:
        if self.max_length < 1:
            raise ValueError(f"packing needs max_length >= 1, got {self.max_length}")
        if self.max_images is not None and self.max_images < 1:
            raise ValueError(f"packing needs max_images >= 1 (or None), got {self.max_images}")

    def fits(self, row: list[Any], item: Any) -> bool:
        """Whether ``item`` may join ``row`` (a non-empty list of items)."""
        length = sum(len(it.input_ids) for it in row) + len(item.input_ids)
        if length > self.max_length:
            return False
        if self.max_images is None:
            return True
        return sum(len(it.image_sizes) for it in row) + len(item.image_sizes) <= self.max_images

    def collate(self, builder: Any, rows: list[list[Any]]) -> dict[str, Any]:
        return collate_packed(builder, rows)

    def fingerprint(self) -> dict[str, Any]:
        """What must match for a saved stream position to mean the same batches."""
        return {"max_length": self.max_length, "max_images": self.max_images}


def collate_packed(builder: Any, rows: list[list[Any]]) -> dict[str, Any]:
    """A batch of packed rows (each a list of :class:`~training.data.vlm.VLMItem`): ``input_ids``,
    ``attention_mask``, ``token_type_ids``, ``labels`` and ``position_ids`` (B rows, L the longest row),
    right-padded; the images (every crop, in row order then sample order: the order the placeholders are
    filled), image sizes and texts of every sample as ``builder.collate`` gives them; ``samples_per_row``."""
    items = [it for row in rows for it in row]
    batch = builder.collate(items)  # images, sizes and texts of the samples in this order
    width = max(sum(len(it.input_ids) for it in row) for row in rows)
    ids = torch.full((len(rows), width), builder.pad_id, dtype=torch.long)  # (B, L)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    types = torch.ones((len(rows), width), dtype=torch.long)
    targets = torch.zeros((len(rows), width), dtype=torch.bool)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for it in row:
            n = len(it.input_ids)
            span = slice(start, start + n)
            ids[r, span] = torch.tensor(it.input_ids)
            mask[r, span] = 1
            types[r, start : start + it.num_prefix] = 0
            targets[r, span] = torch.tensor(it.targets) if it.targets is not None else True
            targets[r, start] = False  # nothing in the sample predicts its first token
            pos[r, span] = torch.arange(n)
            start += n
        pos[r, start:] = torch.arange(width - start)  # the padding: a run of its own
    labels = ids.masked_fill((types == 0) | (mask == 0) | ~targets, IGNORE_INDEX)
    batch.update(
        input_ids=ids,
        attention_mask=mask,
        token_type_ids=types,
        labels=labels,
        position_ids=pos,
        samples_per_row=[len(row) for row in rows],
    )
    return batch
