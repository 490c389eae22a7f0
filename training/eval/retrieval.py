"""Image-text retrieval (recall@k both ways) of two-tower SigLIP models over paired shards or batches."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from PIL import Image

from ..data import ShardLoader, ShardSpec, build_dataset
from .common import eval_mode, model_device

__all__ = ["embed_pairs", "recall_at_k", "retrieval"]


def _first_hit_misses(sims: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Per query row, the number of negatives scoring >= its best positive: (Q, K) -> (Q,)."""
    best = sims.masked_fill(~positive, float("-inf")).amax(dim=1, keepdim=True)  # (Q, 1)
    return ((sims >= best) & ~positive).sum(dim=1)  # (Q,)


def _recall_one_way(
    queries: torch.Tensor,
    keys: torch.Tensor,
    q_groups: torch.Tensor,
    k_groups: torch.Tensor,
    ks: Sequence[int],
    chunk: int,
) -> dict[int, float]:
    hits = dict.fromkeys(ks, 0)
    for start in range(0, len(queries), chunk):
        sims = queries[start : start + chunk] @ keys.T  # (Q, K)
        positive = q_groups[start : start + chunk, None] == k_groups[None, :]  # (Q, K)
        if not positive.any(dim=1).all():
            raise ValueError("a query has no matching item: every image needs a text of its group and back")
        misses = _first_hit_misses(sims, positive)  # (Q,)
        for k in ks:
            hits[k] += int((misses < k).sum())
    return {k: hits[k] / len(queries) for k in ks}


def recall_at_k(
    img_emb: torch.Tensor,
    txt_emb: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
    *,
    img_groups: torch.Tensor | None = None,
    txt_groups: torch.Tensor | None = None,
    chunk: int = 1024,
) -> dict[str, float]:
    """Image->text and text->image recall@k of paired embeddings (N, D), (M, D).

    Image i matches text j when their groups are equal (default: i == j). A query is a hit
    at k when fewer than k non-matching items score at least as high as its best match
    (ties count against it, so a collapsed model scores 0, not 1).
    Returns {"i2t_r1", ..., "t2i_r10"} as fractions.
    """
    if img_groups is None or txt_groups is None:
        if len(img_emb) != len(txt_emb):
            raise ValueError(f"{len(img_emb)} images and {len(txt_emb)} texts: give groups for unpaired sets")
        img_groups = txt_groups = torch.arange(len(img_emb), device=img_emb.device)
    img, txt = img_emb.float(), txt_emb.float()
    i2t = _recall_one_way(img, txt, img_groups, txt_groups, ks, chunk)
    t2i = _recall_one_way(txt, img, txt_groups, img_groups, ks, chunk)
    return {**{f"i2t_r{k}": v for k, v in i2t.items()}, **{f"t2i_r{k}": v for k, v in t2i.items()}}


def _is_shard_spec(data: Any) -> bool:
    if isinstance(data, str | os.PathLike):
        return True
    return (
        isinstance(data, list | tuple) and bool(data) and all(isinstance(x, str | os.PathLike) for x in data)
    )


def embed_pairs(
    model: Any,
    batches: Iterable[dict[str, torch.Tensor]],
    device: torch.device,
    max_samples: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(image emb (N, D), text emb (N, D), input_ids (N, L)) of a stream of batches."""
    imgs, txts, ids, n = [], [], [], 0
    for batch in batches:
        imgs.append(model.encode_image(batch["pixel_values"].to(device)).float())  # (B, D)
        txts.append(model.encode_text(batch["input_ids"].to(device)).float())  # (B, D)
        ids.append(batch["input_ids"].cpu())
        n += len(ids[-1])
        if max_samples is not None and n >= max_samples:
            break
    if n == 0:
        return torch.empty(0), torch.empty(0), torch.empty(0, dtype=torch.long)
    cut = slice(0, max_samples)
    return torch.cat(imgs)[cut], torch.cat(txts)[cut], torch.cat(ids)[cut]


def retrieval(
    model: Any,
    data: ShardSpec | Iterable[dict[str, torch.Tensor]],
    *,
    image_transform: Callable[[Image.Image], torch.Tensor] | None = None,
    text_transform: Callable[[str], torch.Tensor] | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    max_samples: int | None = None,
    ks: Sequence[int] = (1, 5, 10),
    match_identical_captions: bool = True,
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """Recall@k both ways over image-text pairs: shards (one unshuffled pass) or batches.

    Batches are dicts with "pixel_values" (B, 3, H, W) and "input_ids" (B, L). With
    `match_identical_captions`, a text with exactly the same tokens as an image's own
    caption also counts as a match. Returns recall_at_k's keys plus "n" (and "skipped").
    """
    if _is_shard_spec(data):
        if image_transform is None or text_transform is None:
            raise ValueError("retrieval over shards needs image_transform and text_transform")
        dataset = build_dataset(
            data,
            image_transform=image_transform,
            text_transform=text_transform,
            batch_size=batch_size,
            rank=0,
            world_size=1,
            resampled=False,
            shuffle=False,
            drop_last=False,
        )
        data = ShardLoader(dataset, num_workers=num_workers)
    dev = model_device(model, device)
    with eval_mode(model, inference=True):
        img, txt, ids = embed_pairs(model, data, dev, max_samples)
    extra = (
        {
            "skipped": data.skipped,
            "skip_counts": data.skip_counts,
            "truncated_captions": data.truncated_captions,
        }
        if _is_loader(data)
        else {}
    )
    if len(img) == 0:
        raise ValueError(f"retrieval got no samples {extra}")
    groups = torch.unique(ids, dim=0, return_inverse=True)[1].to(dev) if match_identical_captions else None
    result = recall_at_k(img, txt, ks, img_groups=groups, txt_groups=groups)
    return {**result, "n": len(img), **extra}


def _is_loader(data: Any) -> bool:
    return hasattr(data, "skip_counts") and hasattr(data, "state_dict")
