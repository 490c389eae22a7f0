"""Greedy generation with the decoder's KV cache, and image-plus-prompt to text for the command line.

``vlm`` is a :class:`~connectors.VisionLanguageModel`; this module does not import it (the model's
``generate`` calls this one), so it is typed as the ``nn.Module`` it is."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence

import torch
from torch import nn

from vision_tower import load_image

from .base import Grid
from .decoder import new_cache
from .inputs import build_prompts


def _image_grid(vlm: nn.Module, pixel_values: torch.Tensor | None, patch_features, grid) -> Grid:
    if pixel_values is not None:
        p = vlm.tower.config.patch_size
        return (pixel_values.shape[-2] // p, pixel_values.shape[-1] // p)
    if grid is not None:
        return tuple(grid)
    if patch_features is not None:
        side = int(patch_features.shape[1] ** 0.5)
        return (side, side)
    return vlm.grid


def _eos_ids(vlm: nn.Module, eos_token_id: int | list[int] | None) -> list[int]:
    if eos_token_id is None:
        eos_token_id = vlm.decoder.generation_config.eos_token_id
        if eos_token_id is None and vlm.tokenizer is not None:
            eos_token_id = vlm.tokenizer.eos_token_id
    if eos_token_id is None:
        return []
    return [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)


def _pad_id(vlm: nn.Module, eos: list[int]) -> int:
    pad = None if vlm.tokenizer is None else vlm.tokenizer.pad_token_id
    if pad is None:
        pad = vlm.decoder.config.pad_token_id
    return int(pad if pad is not None else (eos[0] if eos else 0))


@torch.no_grad()
def generate(
    vlm: nn.Module,
    pixel_values: torch.Tensor | None = None,
    prompts: Sequence[str] | str | None = None,
    *,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    token_type_ids: torch.Tensor | None = None,
    patch_features: torch.Tensor | None = None,
    grid: Grid | None = None,
    max_new_tokens: int = 32,
    eos_token_id: int | list[int] | None = None,
) -> torch.Tensor:
    """Greedy decoding: one prefill of images and prompts into the KV cache, then one token a step.

    ``prompts`` (strings, tokenized with ``vlm.tokenizer``, left-padded; see
    :func:`connectors.inputs.prompt_ids` for the layout) or ``input_ids`` with their placeholders.
    Prompt tokens are prefix (``token_type_ids`` 0 unless given), generated tokens suffix. Returns the new
    ids (B, T <= max_new_tokens); a row that has produced eos continues with the pad id.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if (prompts is None) == (input_ids is None):
        raise ValueError("pass prompts (strings) or input_ids, exactly one of them")
    eos = _eos_ids(vlm, eos_token_id)
    pad = _pad_id(vlm, eos)
    if prompts is not None:
        if vlm.tokenizer is None:
            raise ValueError("this VLM has no tokenizer: pass input_ids, or build it with tokenizer=")
        grid_ = _image_grid(vlm, pixel_values, patch_features, grid)
        batch = build_prompts(
            vlm.tokenizer,
            [prompts] if isinstance(prompts, str) else list(prompts),
            image_token_id=vlm.image_token_id,
            num_image_tokens=vlm.connector.num_tokens(grid_),
            pad_token_id=pad,
            causal=vlm.attention == "causal",
        )
        device = next(vlm.decoder.parameters()).device
        input_ids, attention_mask = batch.input_ids.to(device), batch.attention_mask.to(device)
        token_type_ids = batch.token_type_ids.to(device)
    B = input_ids.shape[0]
    limit = getattr(vlm.decoder.config.get_text_config(), "max_position_embeddings", None)
    if limit and input_ids.shape[1] + max_new_tokens > limit:
        warnings.warn(
            f"prompt ({input_ids.shape[1]} tokens with the image's) + max_new_tokens ({max_new_tokens}) go "
            f"past the decoder's {limit} positions: the tokens past position {limit} are unreliable",
            stacklevel=2,
        )
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if token_type_ids is None:
        token_type_ids = torch.zeros_like(input_ids)
    out = vlm(
        input_ids,
        pixel_values,
        attention_mask,
        token_type_ids,
        patch_features=patch_features,
        grid=grid,
        cache=new_cache(vlm.decoder),
        use_cache=True,
        logits_to_keep=1,
    )
    done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    eos_t = torch.tensor(eos, dtype=torch.long, device=input_ids.device)
    new: list[torch.Tensor] = []
    for step in range(max_new_tokens):
        logits = out.logits[:, -1].clone()  # (B, V)
        logits[:, vlm.image_token_id] = float("-inf")  # a placeholder is never an answer (it needs an image)
        token = logits.argmax(-1).masked_fill(done, pad)  # (B,)
        new.append(token)
        done |= torch.isin(token, eos_t)
        if done.all() or step == max_new_tokens - 1:
            break
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((B, 1))], dim=1)
        out = vlm(token[:, None], attention_mask=attention_mask, cache=out.cache, use_cache=True)
    return torch.stack(new, dim=1)  # (B, T)


def generate_text(
    vlm: nn.Module,
    images: Sequence[str | os.PathLike],
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 32,
) -> list[str]:
    """Load image files, preprocess them with the VLM's processor, continue each prompt, decode the text."""
    if vlm.tokenizer is None:
        raise ValueError("this VLM has no tokenizer files: it cannot turn prompts into ids or ids into text")
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images for {len(prompts)} prompts: give one prompt per image")
    param = next(vlm.tower.parameters())
    pixels = vlm.image_processor()([load_image(f) for f in images]).to(param.device, param.dtype)
    ids = generate(vlm, pixels, list(prompts), max_new_tokens=max_new_tokens)
    return vlm.tokenizer.batch_decode(ids, skip_special_tokens=True)
