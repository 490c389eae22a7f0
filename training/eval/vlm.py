"""Held-out evaluation of a vision-language model: the mean next-token loss over the answer tokens
(teacher forcing) and the share of samples whose greedy answer equals the reference (caption exact
match, or answer accuracy for prompt/answer data), compared after lower-casing and collapsing
whitespace. Run by the VLM task every ``run.eval_every`` steps and by ``vision-tower eval vlm``.

Every rank reads the same held-out samples and evaluates every ``world``-th one; ranks pad their
share to equal length (padding rows count for nothing) and, under ZeRO-3, generate a fixed number of
tokens, so all ranks run the same forward passes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from connectors.inputs import IGNORE_INDEX

from ..data.json_source import JsonSource
from ..data.shards import ShardSpec, SkipCounter, SkipSample, expand_shards, iter_tar_samples
from ..data.vlm import VLMBuilder, VLMItem
from .common import eval_mode


def normalize(text: str) -> str:
    """Lower case, single spaces: how a generated answer is compared with the reference."""
    return re.sub(r"\s+", " ", text).strip().lower()


def exact_match(generated: str, reference: str) -> bool:
    return normalize(generated) == normalize(reference)


def read_eval_items(
    builder: VLMBuilder, data: ShardSpec | JsonSource, limit: int | None = None
) -> list[VLMItem]:
    """The first ``limit`` (None: every) usable samples of ``data`` in order (one pass; bad samples passed
    over): shards, or a :class:`~training.data.json_source.JsonSource` (its records in file order)."""
    if isinstance(data, JsonSource):  # a JSON file and its image folder, read piece after piece
        urls, read, where, held = data.urls, data.read, data.path, "the file holds"
    else:
        urls, read, where, held = expand_shards(data), iter_tar_samples, data, "the shards hold"
    counter = SkipCounter(max_consecutive=1 << 62)
    items: list[VLMItem] = []
    for url in urls:
        for sample in read(url, counter):
            try:
                item = builder.build(sample)
                if item.targets is not None and item.prompt_ids is None:
                    raise SkipSample(
                        "bad_conversation", "an image after the first reply: its answer cannot be asked"
                    )
                items.append(item)
            except SkipSample as skip:
                counter.skip(skip.reason, sample["__key__"], sample.get("__url__", url), skip.detail)
                continue
            if limit is not None and len(items) >= limit:
                return items
    if not items:
        skipped = ", ".join(f"{n} {reason}" for reason, n in sorted(counter.counts.items()))
        raise ValueError(
            f"no usable held-out sample in {where!r}: "
            + (f"every sample was skipped ({skipped})" if skipped else f"{held} no samples")
        )
    return items


@dataclass
class EvalResult:
    loss: float  # mean next-token cross-entropy over answer tokens
    exact_match: float  # share of samples whose greedy answer equals the reference
    samples: int
    predictions: list[dict[str, str]] = field(
        default_factory=list
    )  # this rank's: key, prompt, answer, generated

    def metrics(self) -> dict[str, float]:
        return {"val_loss": self.loss, "exact_match": self.exact_match, "eval_samples": self.samples}


def _my_share(items: list[VLMItem], rank: int, world: int) -> tuple[list[VLMItem], list[bool]]:
    """Every ``world``-th item from ``rank``, padded (with the first item, weight 0) to the longest share."""
    mine = items[rank::world]
    size = math.ceil(len(items) / world)
    real = [True] * len(mine) + [False] * (size - len(mine))
    return mine + [items[0]] * (size - len(mine)), real


@torch.no_grad()
def evaluate_vlm(
    vlm: nn.Module,
    items: list[VLMItem],
    builder: VLMBuilder,
    *,
    batch_size: int = 16,
    max_new_tokens: int = 32,
    fixed_length: bool = False,
    match: Callable[[str, str], bool] = exact_match,
) -> EvalResult:
    """Loss and greedy answers of ``vlm`` on ``items`` (from :func:`read_eval_items`), split over the
    ranks of the default process group (collective when there are several). ``fixed_length``: every
    rank generates ``max_new_tokens`` tokens (ZeRO-3: the ranks run the same forward passes)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    mine, real = _my_share(items, rank, world)
    param = next(vlm.connector.parameters())
    totals = torch.zeros(4, dtype=torch.float64)  # loss sum, answer tokens, matches, samples
    predictions: list[dict[str, str]] = []
    with eval_mode(vlm):
        for start in range(0, len(mine), batch_size):
            chunk, weight = mine[start : start + batch_size], real[start : start + batch_size]
            batch = builder.collate(chunk)
            keep = torch.tensor(weight)
            totals[:2] += _loss_sums(vlm, batch, keep, param)
            generated = _answers(vlm, batch, builder, param, max_new_tokens, fixed_length)
            for item, text, counted in zip(chunk, generated, weight):
                if counted:
                    totals[2] += float(match(text, item.text))
                    totals[3] += 1
                    predictions.append(
                        {"key": item.key, "prompt": item.prompt, "answer": item.text, "generated": text}
                    )
    if world > 1:
        dist.all_reduce(totals)
    loss_sum, tokens, matches, samples = totals.tolist()
    return EvalResult(loss_sum / max(tokens, 1), matches / max(samples, 1), int(samples), predictions)


def _images(batch: dict[str, Any], param: torch.Tensor) -> dict[str, Any]:
    """The batch's pixels (every crop), or its cached features and their grid, and each image's size, as
    the VLM takes them."""
    sizes = {"image_sizes": batch["image_sizes"]}
    if "patch_features" in batch:
        return {
            "patch_features": batch["patch_features"].to(param.device, param.dtype),
            "grid": batch["grid"],
            **sizes,
        }
    return {"pixel_values": batch["pixel_values"].to(param.device, param.dtype), **sizes}


def _loss_sums(vlm, batch: dict[str, Any], keep: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """(sum of the answer tokens' cross-entropy, their count) over the rows ``keep`` marks; logits only at
    the answer tokens, as in training."""
    device = param.device
    labels = batch["labels"].to(device).masked_fill(~keep.to(device)[:, None], IGNORE_INDEX)
    inputs = {
        "input_ids": batch["input_ids"].to(device),
        "attention_mask": batch["attention_mask"].to(device),
        "token_type_ids": batch["token_type_ids"].to(device),
        "labels": labels,
    }
    count = vlm.count_targets(**inputs)
    loss = vlm(**inputs, **_images(batch, param), num_items_in_batch=1, targets_only=True).loss
    return torch.tensor([float(loss), float(count)], dtype=torch.float64)


def _prompts(batch: dict[str, Any], pad: int, device: torch.device) -> dict[str, Any]:
    """The prompts to continue: the strings of single-turn samples, or a conversation's ids up to its first
    reply (as rendered by the chat template), left-padded."""
    rows = batch.get("prompt_ids")
    if rows is None:
        return {"prompts": batch["prompt"]}
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def _answers(vlm, batch, builder: VLMBuilder, param, max_new_tokens: int, fixed_length: bool) -> list[str]:
    """Greedy answers to each row's prompt, cut at the first eos, decoded."""
    eos = builder.tokenizer.eos_token_id
    ids = vlm.generate(
        **_prompts(batch, builder.pad_id, param.device),
        max_new_tokens=max_new_tokens,
        eos_token_id=[] if fixed_length else eos,  # [] never stops early: the same steps on every rank
        **_images(batch, param),
    )  # (B, T)
    texts = []
    for row in ids.tolist():
        row = row[: row.index(eos)] if eos in row else row
        texts.append(builder.tokenizer.decode(row, skip_special_tokens=True))
    return texts
