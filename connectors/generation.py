"""Generation with the decoder's KV cache (greedy, or sampled through transformers' logits processors:
temperature, top-k, top-p, repetition penalty; stop strings), and image-plus-prompt to text for the command
line.

``vlm`` is a :class:`~connectors.VisionLanguageModel`; this module does not import it (the model's
``generate`` calls this one), so it is typed as the ``nn.Module`` it is."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from vision_tower import load_image

from .base import Grid
from .chat_template import chat_prompt_ids
from .decoder import new_cache
from .inputs import build_prompts, prompt_ids, text_ids


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
    image_sizes: torch.Tensor | Sequence[Sequence[int]] | None = None,
    max_new_tokens: int = 32,
    eos_token_id: int | list[int] | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float | None = None,
    stop_strings: Sequence[str] = (),
    seed: int | None = None,
) -> torch.Tensor:
    """One prefill of images and prompts into the KV cache, then one token a step: the most likely
    (greedy), or with ``do_sample`` drawn from the distribution that ``temperature``, ``top_k`` and
    ``top_p`` shape (transformers' logits warpers; ``seed`` makes the draw repeatable).
    ``repetition_penalty`` (transformers' processor, over the prompt and what was generated) applies to
    both. A row ends at eos or once its decoded text holds one of ``stop_strings`` (the string included).

    ``prompts`` (strings, tokenized with ``vlm.tokenizer``, left-padded; see
    :func:`connectors.inputs.prompt_ids` for the layout; one image each) or ``input_ids`` with their
    placeholders. ``image_sizes`` (num_images, 2): each image's size, with the crops of a tiled image layout
    in ``pixel_values`` (``vlm.image_inputs(images)`` makes both); each prompt gets its image's count of
    placeholders.
    Prompt tokens are prefix (``token_type_ids`` 0 unless given), generated tokens suffix. The image
    placeholder is never produced; rows of the decoder past the tokenizer's vocabulary are left as
    transformers leaves them (a trained model gives them no mass). Returns the new ids
    (B, T <= max_new_tokens); a row that has ended continues with the pad id.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if stop_strings and vlm.tokenizer is None:
        raise ValueError("stop_strings need the VLM's tokenizer to decode what was generated")
    processors = logits_processors(do_sample, temperature, top_k, top_p, repetition_penalty)
    rng = None if seed is None else torch.Generator().manual_seed(seed)
    if (prompts is None) == (input_ids is None):
        raise ValueError("pass prompts (strings) or input_ids, exactly one of them")
    eos = _eos_ids(vlm, eos_token_id)
    pad = _pad_id(vlm, eos)
    if prompts is not None:
        if vlm.tokenizer is None:
            raise ValueError("this VLM has no tokenizer: pass input_ids, or build it with tokenizer=")
        texts = [prompts] if isinstance(prompts, str) else list(prompts)
        counts, images = None, None
        if image_sizes is not None:  # the layout's ids (placeholders and text) for each image's size
            images = [vlm.image_prompt_ids(s) for s in torch.as_tensor(image_sizes).reshape(-1, 2).tolist()]
            if len(images) != len(texts):
                raise ValueError(f"{len(images)} images for {len(texts)} prompts: one image per prompt")
        else:
            counts = vlm.connector.num_tokens(_image_grid(vlm, pixel_values, patch_features, grid))
        batch = build_prompts(
            vlm.tokenizer,
            texts,
            image_token_id=vlm.image_token_id,
            num_image_tokens=counts,
            image=images,
            pad_token_id=pad,
            causal=vlm.attention != "prefix",  # causal and Gemma 3's image attention: LLaVA's layout
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
        image_sizes=image_sizes,
        patch_features=patch_features,
        grid=grid,
        cache=new_cache(vlm.decoder),
        use_cache=True,
        logits_to_keep=1,
    )
    done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    eos_t = torch.tensor(eos, dtype=torch.long, device=input_ids.device)
    seen = input_ids  # (B, L + t): what the repetition penalty looks at
    new: list[torch.Tensor] = []
    for step in range(max_new_tokens):
        logits = out.logits[:, -1].float().clone()  # (B, V)
        logits[:, vlm.image_token_id] = float("-inf")  # a placeholder is never an answer (it needs an image)
        logits = processors(seen, logits)
        if do_sample:
            probs = logits.softmax(-1)
            token = torch.multinomial(probs.cpu(), 1, generator=rng)[:, 0].to(logits.device)
        else:
            token = logits.argmax(-1)
        token = token.masked_fill(done, pad)  # (B,)
        new.append(token)
        seen = torch.cat([seen, token[:, None]], dim=1)
        done |= torch.isin(token, eos_t)
        if stop_strings:
            done |= _stopped(vlm.tokenizer, torch.stack(new, dim=1), stop_strings)
        if done.all() or step == max_new_tokens - 1:
            break
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((B, 1))], dim=1)
        out = vlm(token[:, None], attention_mask=attention_mask, cache=out.cache, use_cache=True)
    return torch.stack(new, dim=1)  # (B, T)


def images_per_prompt(prompts: Sequence[str], n_images: int, image_token: str) -> list[int]:
    """How many of ``n_images`` each prompt takes, in order: one per ``image_token`` it writes, one if it
    writes none."""
    takes = [max(1, p.count(image_token)) for p in prompts]
    if sum(takes) != n_images:
        raise ValueError(
            f"{n_images} image(s) for prompts that take {sum(takes)} ({takes}): a prompt takes one image per "
            f"{image_token} it writes, one if it writes none"
        )
    return takes


def multi_image_prompt_ids(vlm: nn.Module, prompt: str, sizes: Sequence[Sequence[int]]) -> list[int]:
    """The ids of a plain (not chat) prompt about several images, each placed where the prompt writes the
    image token, LLaVA style: bos (if the tokenizer adds one), the text before the first image, the image's
    ids (its layout's placeholders and text), the text after it, and so on; the text as text."""
    tok = vlm.tokenizer
    image_token = tok.convert_ids_to_tokens(vlm.image_token_id)
    first, *rest = prompt.split(image_token)
    if len(rest) != len(sizes):
        raise ValueError(
            f"prompt writes {image_token} {len(rest)} time(s) for {len(sizes)} images: {prompt!r}"
        )
    spans = [list(vlm.image_prompt_ids(s)) for s in sizes]
    causal = vlm.attention != "prefix"
    ids = prompt_ids(tok, first + image_token + rest[0], image_token, vlm.image_token_id, spans[0], causal)
    for span, text in zip(spans[1:], rest[1:], strict=True):
        ids += span + text_ids(tok, text)
    return ids


def generate_text(
    vlm: nn.Module,
    images: Sequence[str | os.PathLike],
    prompts: Sequence[str],
    *,
    chat: bool = False,
    chat_template: str | None = None,
    **options: Any,
) -> list[str]:
    """Load image files, preprocess them with the VLM's processor, continue each prompt, decode the text
    (cut after the first of ``stop_strings`` it holds). Each prompt takes the next images in order: one per
    image token it writes (``"<image> and <image>: the same?"`` takes two), one if it writes none.
    ``chat``: each prompt is a user's turn rendered with the chat template (``chat_template``, Jinja text,
    else the VLM's own: the one it was trained and saved with) and its generation prompt, as training
    renders conversations (:func:`connectors.chat_template.chat_prompt_ids`). ``options``: those of
    :func:`generate`."""
    if vlm.tokenizer is None:
        raise ValueError("this VLM has no tokenizer files: it cannot turn prompts into ids or ids into text")
    image_token = vlm.tokenizer.convert_ids_to_tokens(vlm.image_token_id)
    takes = images_per_prompt(prompts, len(images), image_token)
    param = next(vlm.tower.parameters())
    pixels, sizes = vlm.image_inputs([load_image(f) for f in images])  # every crop, each image's size
    pixels = pixels.to(param.device, param.dtype)
    chat = chat or chat_template is not None
    if not chat and all(n == 1 for n in takes):  # one image a prompt: the prompts as generate lays them out
        ids = generate(vlm, pixels, list(prompts), image_sizes=sizes, **options)
    else:
        rows, start = [], 0
        for prompt, n in zip(prompts, takes, strict=True):
            own = sizes[start : start + n].tolist()
            start += n
            if chat:
                rows.append(chat_prompt_ids(vlm, prompt, own, chat_template))
            else:
                rows.append(multi_image_prompt_ids(vlm, prompt, own))
        width = max(map(len, rows))
        pad = _pad_id(vlm, _eos_ids(vlm, options.get("eos_token_id")))
        input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])  # (B, L) left-padded
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        device = next(vlm.decoder.parameters()).device
        ids = generate(
            vlm,
            pixels,
            input_ids=input_ids.to(device),
            attention_mask=mask.to(device),
            image_sizes=sizes,
            **options,
        )
    texts = vlm.tokenizer.batch_decode(ids, skip_special_tokens=True)
    return [_cut(t, options.get("stop_strings", ())) for t in texts]


def logits_processors(
    do_sample: bool,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    repetition_penalty: float | None,
) -> LogitsProcessorList:
    """transformers' processors for these settings, in the order its ``generate`` applies them
    (repetition penalty, then the sampling warpers); each refuses a value out of range."""
    steps = LogitsProcessorList()
    if repetition_penalty is not None and repetition_penalty != 1.0:
        steps.append(RepetitionPenaltyLogitsProcessor(repetition_penalty))
    if not do_sample:
        if temperature != 1.0 or top_k is not None or top_p is not None:
            raise ValueError("temperature, top_k and top_p shape sampling: pass do_sample=True (--sample)")
        return steps
    if temperature != 1.0:
        steps.append(TemperatureLogitsWarper(temperature))
    if top_k is not None:
        steps.append(TopKLogitsWarper(top_k))
    if top_p is not None and top_p < 1.0:
        steps.append(TopPLogitsWarper(top_p))
    return steps


def _stopped(tokenizer: Any, ids: torch.Tensor, stop_strings: Sequence[str]) -> torch.Tensor:
    """(B,) True for the rows whose decoded text holds one of ``stop_strings``."""
    texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
    return torch.tensor([any(s in t for s in stop_strings) for t in texts], device=ids.device)


def _cut(text: str, stop_strings: Sequence[str]) -> str:
    """``text`` up to and including the first stop string in it."""
    ends = [text.index(s) + len(s) for s in stop_strings if s in text]
    return text[: min(ends)] if ends else text
