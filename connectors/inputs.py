"""Token-level inputs of the VLM: positions, attention masks, ignored labels and prompt layout."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel
from transformers.masking_utils import (
    and_masks,
    create_causal_mask,
    create_masks_for_generate,
    sliding_window_overlay,
)

from .layouts import ImageLayout

IGNORE_INDEX = -100
# prefix: PaliGemma's; causal: LLaVA's; image_bidirectional: Gemma 3's (causal, each image's tokens both ways)
ATTENTION = ("prefix", "causal", "image_bidirectional")
# transformers builds a bidirectional block from ``block_sequence_ids`` without vmap (fast); older versions
# only take an ``or_mask_function`` (vmapped: about 50x slower mask building)
BLOCK_IDS = "block_sequence_ids" in inspect.signature(create_masks_for_generate).parameters


def positions(attention_mask: torch.Tensor, q_len: int) -> torch.Tensor:
    """Position ids of the last ``q_len`` tokens: count of attended tokens before each (left padding
    allowed). (B, L_total) -> (B, q_len)."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp(min=0)[:, -q_len:]


def _prefix_overlay(prefix: torch.Tensor) -> Callable[..., torch.Tensor]:
    """A mask function letting every prefix token see every other prefix token (both ways)."""

    def overlay(batch_idx, head_idx, q_idx, kv_idx):
        return prefix[batch_idx, q_idx] & prefix[batch_idx, kv_idx]

    return overlay


def _block_overlay(blocks: torch.Tensor) -> Callable[..., torch.Tensor]:
    """A mask function letting the tokens of one block (``blocks`` (B, L) >= 0) see each other both ways."""

    def overlay(batch_idx, head_idx, q_idx, kv_idx):
        return (blocks[batch_idx, q_idx] == blocks[batch_idx, kv_idx]) & (blocks[batch_idx, q_idx] >= 0)

    return overlay


def _same_sample(samples: torch.Tensor) -> Callable[..., torch.Tensor]:
    """A mask function keeping each token within its own sample (``samples``: :func:`packed_samples`)."""

    def overlay(batch_idx, head_idx, q_idx, kv_idx):
        return samples[batch_idx, q_idx] == samples[batch_idx, kv_idx]

    return overlay


def packed_samples(
    position_ids: torch.Tensor, attention_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows holding several samples, told apart by their positions: a sample is a run of tokens whose
    positions go up by one (transformers' packed-sequence format, ``find_packed_sequence_indices``). Returns
    the positions the masks read, with every padding token (``attention_mask`` 0) at -2 so that it is a
    sample of its own that no real token sees, and (B, L) the index of each token's sample in its row."""
    real = attention_mask.bool()
    at = position_ids.masked_fill(~real, -2)  # (B, L)
    step = torch.diff(at, prepend=at[:, :1] - 1, dim=-1)
    return at, (step != 1).long().cumsum(-1)  # (B, L), (B, L)


def image_block_ids(
    input_ids: torch.Tensor, image_token_id: int, tokens_per_image: Sequence[int]
) -> torch.Tensor:
    """(B, L) the index of the image block each placeholder belongs to, -1 on every other token: the images'
    placeholders are taken in order (row by row, as the image tokens fill them), ``tokens_per_image`` of
    them per image, and a block is one image's unbroken run of placeholders. So two images next to each
    other in a prompt are two blocks, and so are the crops of one image that text separates (pan and scan's
    ``<start_of_image>`` blocks), as transformers' Gemma 3 groups runs of image tokens. The caller has
    checked that the counts add up to the placeholders."""
    is_image = input_ids == image_token_id  # (B, L)
    counts = torch.as_tensor(list(tokens_per_image), dtype=torch.long, device=input_ids.device)
    image = torch.full_like(input_ids, -1).reshape(-1)
    image[is_image.reshape(-1)] = torch.repeat_interleave(
        torch.arange(len(counts), device=input_ids.device), counts
    )
    image = image.reshape(input_ids.shape)  # (B, L): the image of each placeholder
    before = torch.nn.functional.pad(image[:, :-1], (1, 0), value=-1)  # (B, L): the image of the token before
    starts = is_image & (image != before)  # a run begins: after a non-image token or another image's token
    blocks = starts.reshape(-1).cumsum(0).reshape(input_ids.shape) - 1
    return torch.where(is_image, blocks, torch.full_like(blocks, -1))


def _image_block_masks(
    decoder: PreTrainedModel,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor | None,
    cache: Any,
    position_ids: torch.Tensor | None,
    blocks: torch.Tensor,
    samples: torch.Tensor | None = None,
) -> Any:
    """Gemma 3's masks (transformers' ``create_masks_for_vision_model``): a global layer attends causally
    or within the token's image block; a sliding-window layer the same, then cut to its window
    (``AND(window, OR(causal, block))``: an image token sees the later tokens of its image, but no earlier
    token past the window). A config without ``layer_types`` gets one mask, windowed if it has a window.
    Built for a prompt with nothing cached (the VLM's decoding steps are causal), where every layer's keys
    are the prompt's tokens: the block ids need no padding to a cache's length. ``samples`` (packed rows,
    :func:`packed_samples`): every layer also keeps each token within its own sample; a full layer through
    transformers' packed format (``attention_mask`` None, ``position_ids`` restarting at each sample), a
    sliding-window layer through an explicit overlay (transformers would read the window's overlay in
    per-sample positions but the image blocks in row indices)."""
    config = decoder.config.get_text_config()
    args = (config, inputs_embeds, attention_mask, cache, position_ids)
    window = getattr(config, "sliding_window", None)
    kinds = getattr(config, "layer_types", None) or ["sliding_attention" if window else "full_attention"]
    masks = {}
    for kind in dict.fromkeys(kinds):
        if kind == "full_attention" and (BLOCK_IDS or samples is None):
            extra = (
                {"block_sequence_ids": blocks} if BLOCK_IDS else {"or_mask_function": _block_overlay(blocks)}
            )
            masks[kind] = create_causal_mask(*args, **extra)
        elif kind in ("full_attention", "sliding_attention"):
            within = [] if samples is None else [_same_sample(samples)]
            if kind == "sliding_attention":
                within.insert(0, sliding_window_overlay(window))
            own = (
                config,
                inputs_embeds,
                attention_mask,
                cache,
                None if samples is not None else position_ids,
            )
            masks[kind] = create_causal_mask(
                *own, or_mask_function=_block_overlay(blocks), and_mask_function=and_masks(*within)
            )
        else:
            raise ValueError(
                f"attention='image_bidirectional' builds masks for full and sliding-window layers; this "
                f"decoder ({config.model_type}) has {kind!r} layers: use attention='causal'"
            )
    return masks if getattr(config, "layer_types", None) else masks[kinds[0]]


def decoder_masks(
    decoder: PreTrainedModel,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    cache: Any,
    position_ids: torch.Tensor,
    prefix: torch.Tensor | None,
    image_blocks: torch.Tensor | None = None,
    packed: bool = False,
) -> Any:
    """The attention mask(s) the decoder's layers take, per layer type (full / sliding window), in the
    format of its attention implementation; ``prefix`` (B, L) True where a token attends
    bidirectionally within the prefix (PaliGemma); ``image_blocks`` (B, L) the image of each image token,
    -1 elsewhere (:func:`image_block_ids`): causal attention, and both ways within each image (Gemma 3);
    both None for causal attention everywhere. ``packed`` (a prompt with nothing cached): the rows hold
    several samples whose ``position_ids`` restart at each (:func:`packed_samples`); a token attends only
    within its own sample, by that sample's own mask (its prefix, its images)."""
    if (prefix is not None or image_blocks is not None) and decoder.config._attn_implementation.startswith(
        "flash"
    ):
        kind = "prefix" if prefix is not None else "image_bidirectional"
        raise ValueError(
            f"{kind} attention needs an explicit mask, which flash attention cannot take: load the decoder "
            "with attn_implementation='sdpa' or 'eager', or use attention='causal'"
        )
    if packed:
        return _packed_masks(decoder, inputs_embeds, attention_mask, position_ids, prefix, image_blocks)
    if image_blocks is not None:
        return _image_block_masks(decoder, inputs_embeds, attention_mask, cache, position_ids, image_blocks)
    extra: dict[str, Any] = {}
    if prefix is not None and BLOCK_IDS:
        extra["block_sequence_ids"] = torch.where(prefix, 0, -1)  # block 0 bidirectional, -1 causal
    elif prefix is not None:
        extra["or_mask_function"] = _prefix_overlay(prefix)
    return create_masks_for_generate(
        decoder.config, inputs_embeds, attention_mask, cache, position_ids, **extra
    )


def _packed_masks(
    decoder: PreTrainedModel,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    prefix: torch.Tensor | None,
    image_blocks: torch.Tensor | None,
) -> Any:
    """:func:`decoder_masks` of packed rows. transformers' own packed-sequence support does the work: with no
    2D mask and positions that restart, its mask functions read per-sample positions and add a same-sample
    condition, and flash attention runs each sample on its own (varlen; in a batch of one row only).
    Padding is kept out by its positions (:func:`packed_samples`); each sample's prefix is a block of its
    own. An older transformers without ``block_sequence_ids`` gets the same mask from explicit overlays."""
    if decoder.config._attn_implementation.startswith("flash") and inputs_embeds.shape[0] > 1:
        raise ValueError(
            "packed rows under flash attention: transformers keeps the samples of a packed row apart only "
            f"in a batch of one row, this one has {inputs_embeds.shape[0]}; set data.batch_size: 1 (one long "
            "row), or load the decoder with attn_implementation='sdpa'"
        )
    at, samples = packed_samples(position_ids, attention_mask)
    if image_blocks is not None:
        return _image_block_masks(decoder, inputs_embeds, None, None, at, image_blocks, samples)
    blocks = None if prefix is None else torch.where(prefix & attention_mask.bool(), samples, -1)
    if BLOCK_IDS:
        extra = {} if blocks is None else {"block_sequence_ids": blocks}
        return create_masks_for_generate(decoder.config, inputs_embeds, None, None, at, **extra)
    extra = {"and_mask_function": _same_sample(samples)}
    if blocks is not None:
        extra["or_mask_function"] = _block_overlay(blocks)
    return create_masks_for_generate(decoder.config, inputs_embeds, None, None, None, **extra)


def ignored_labels(
    labels: torch.Tensor,
    input_ids: torch.Tensor,
    image_token_id: int,
    token_type_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
) -> torch.Tensor:
    """``labels`` with -100 on image tokens, on the prefix (``token_type_ids`` 0) and on padding."""
    drop = input_ids == image_token_id
    if token_type_ids is not None:
        drop |= token_type_ids == 0
    if attention_mask is not None:
        drop |= attention_mask == 0
    return labels.masked_fill(drop, IGNORE_INDEX)


def count_targets(kept: torch.Tensor) -> int:
    """How many next-token targets the loss of a batch averages over: the labels :func:`ignored_labels`
    keeps (``kept``, (B, L)), the first position of each row excepted (nothing predicts it)."""
    return int((kept[:, 1:] != IGNORE_INDEX).sum())


@dataclass
class PromptBatch:
    """Left-padded prompts with their image placeholders; every token is prefix (token type 0)."""

    input_ids: torch.Tensor  # (B, L)
    attention_mask: torch.Tensor  # (B, L)
    token_type_ids: torch.Tensor  # (B, L)


def image_ids(tokenizer: Any, prompt: Sequence[int | str], image_token_id: int) -> list[int]:
    """One image's ids in a prompt from its layout's segments (``ImagePlan.prompt``): each int a run of
    that many ``image_token_id`` placeholders, each str the layout's text (Idefics3's
    ``"<fake_token_around_image><row_1_col_1>"``, Gemma 3's ``"\\n\\n<start_of_image>"``) tokenized with
    special tokens parsed and no bos, as transformers' processors tokenize the text they put in place of
    the image's marker (placeholders split the text there as well)."""
    ids: list[int] = []
    for segment in prompt:
        if isinstance(segment, int):
            ids += [image_token_id] * segment
        elif tokenizer is None:
            raise ValueError(f"the image layout writes {segment!r} in the prompt: that needs a tokenizer")
        else:
            ids += tokenizer(segment, add_special_tokens=False)["input_ids"]
    return ids


def check_layout_tokens(tokenizer: Any, layout: ImageLayout) -> None:
    """Refuse a tokenizer that lacks, as single tokens, the special tokens ``layout``'s prompts write."""
    missing = []
    for token in layout.text_tokens():
        ids = tokenizer(token, add_special_tokens=False)["input_ids"]
        if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
            missing.append(token)
    if missing:
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        raise ValueError(
            f"image layout {layout.name!r} writes {shown} in the prompt, which the decoder's tokenizer does "
            "not hold as single tokens: use a decoder whose tokenizer has them (Idefics3 / SmolVLM for "
            "'split', Gemma 3 for 'pan_and_scan'), or add them (tokenizer.add_special_tokens, "
            "decoder.resize_token_embeddings) and train their embeddings"
        )


def prompt_ids(
    tokenizer: Any,
    prompt: str,
    image_token: str,
    image_token_id: int,
    image: int | Sequence[int],
    causal: bool = False,
) -> list[int]:
    """One prompt's ids. ``image``: the image's ids (:func:`image_ids`: placeholders and the layout's
    text), or a count of placeholders alone. A prompt holding ``image_token`` (LLaVA style: ``"USER:
    <image>\\nWhat is this? ASSISTANT:"``) gets it expanded in place to those ids. Any other
    prompt follows PaliGemma's layout (placeholders, then bos, the text and a newline), or, for a
    ``causal`` model (LLaVA's), is read as ``image_token + prompt``: bos, placeholders, the text, as
    ``LlavaProcessor`` lays out ``"<image>" + prompt``. The text around the placeholder is text: special
    tokens written in it (``<eos>``, ``<bos>``) are not parsed."""
    image = [image_token_id] * image if isinstance(image, int) else list(image)
    if causal and image_token not in prompt:
        prompt = image_token + prompt
    if image_token in prompt:
        before, _, after = prompt.partition(image_token)
        if image_token in after:
            raise ValueError(f"prompt holds {image_token!r} more than once; one image per prompt: {prompt!r}")
        whole = _in_one_piece(tokenizer, prompt, image_token_id, add_bos=not before)
        if whole is not None:
            at = whole.index(image_token_id)
            return whole[:at] + image + whole[at + 1 :]
        head = _bos(tokenizer)
        if before:  # the tokenizer's own start (bos, if it adds one), then the text as text
            head = tokenizer(before, add_special_tokens=True, split_special_tokens=True)["input_ids"]
            plain = tokenizer(before, add_special_tokens=False, split_special_tokens=True)["input_ids"]
            if plain and head[len(head) - len(plain) :] == plain:
                head = head[: len(head) - len(plain)] + _as_text(tokenizer, plain, before)
        return head + image + text_ids(tokenizer, after)
    return image + _bos(tokenizer) + text_ids(tokenizer, prompt + "\n")


def text_ids(tokenizer: Any, text: str) -> list[int]:
    """The ids of ``text`` as plain text: no bos/eos added, and special tokens written in it (``<image>``,
    ``<eos>``) split into ordinary pieces instead of parsed, so a caption cannot end an answer early or
    add an image placeholder. Special tokens are inserted by id by the callers."""
    return _as_text(
        tokenizer, tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"], text
    )


@functools.lru_cache(maxsize=8)
def _special_ids(tokenizer: Any, size: int) -> frozenset[int]:
    """The ids of the tokenizer's special tokens but its unknown token, per tokenizer and size (a token
    added later gives a new size). An added token marked not special (Gemma's newline piece, listed among
    the additional special tokens all the same) is text: the prompt layout and transformers' processors
    write it."""
    added = tokenizer.added_tokens_decoder
    special = {i for i, t in added.items() if getattr(t, "special", False)}
    special |= {i for i in tokenizer.all_special_ids if i not in added or getattr(added[i], "special", True)}
    special.discard(tokenizer.unk_token_id)
    return frozenset(special)


def _as_text(tokenizer: Any, ids: list[int], text: str) -> list[int]:
    """``ids`` of ``text`` without special tokens: a tokenizer whose vocabulary itself holds ``<image>`` or
    ``<eos>`` (a word-level one) reads them as those tokens even when told not to parse special tokens;
    they become its unknown token, as any other word it cannot spell."""
    special = _special_ids(tokenizer, len(tokenizer))
    if special.isdisjoint(ids):
        return ids
    if tokenizer.unk_token_id is None:
        found = sorted({tokenizer.convert_ids_to_tokens(i) for i in ids if i in special})
        raise ValueError(
            f"the text {text[:80]!r} spells the special token(s) {found}, which this tokenizer can only read "
            "as those tokens (it has no unknown token to read them as text)"
        )
    return [tokenizer.unk_token_id if i in special else i for i in ids]


def _in_one_piece(tokenizer: Any, prompt: str, image_token_id: int, add_bos: bool) -> list[int] | None:
    """``prompt`` (holding the image token once) tokenized whole, as a processor tokenizes it: the text
    around the image token read in one piece (a SentencePiece tokenizer marks no string start after the
    image token: ``\nwhat``, not ``▁\nwhat``), the tokenizer's own start added, or (``add_bos``, a prompt
    that starts with the image) the bos put first. None when the text spells another special token or a
    piece reads as one: text stays text, and the caller tokenizes the pieces apart."""
    ids = tokenizer(prompt, add_special_tokens=not add_bos)["input_ids"]
    if add_bos:
        ids = _bos(tokenizer) + ids
    head = _bos(tokenizer)
    body = ids[len(head) :] if head and ids[: len(head)] == head else ids
    special = _special_ids(tokenizer, len(tokenizer)) - {image_token_id}
    if body.count(image_token_id) != 1 or not special.isdisjoint(body):
        return None
    return ids


def _bos(tokenizer: Any) -> list[int]:
    return [] if tokenizer.bos_token_id is None else [int(tokenizer.bos_token_id)]


def build_prompts(
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    image_token_id: int,
    num_image_tokens: int | Sequence[int] | None = None,
    image: Sequence[Sequence[int]] | None = None,
    pad_token_id: int,
    causal: bool = False,
) -> PromptBatch:
    """Tokenize ``prompts`` (one image each, laid out by :func:`prompt_ids`) and left-pad them into a
    batch. Each image is ``num_image_tokens`` placeholders (one count for all, or one per prompt), or, with
    ``image``, the ids of each prompt's image (``vlm.image_prompt_ids(size)``: placeholders and the image
    layout's text)."""
    image_token = tokenizer.convert_ids_to_tokens(image_token_id)
    if (num_image_tokens is None) == (image is None):
        raise ValueError("pass num_image_tokens (placeholder counts) or image (each image's ids), not both")
    if image is None:
        n = num_image_tokens
        image = [n] * len(prompts) if isinstance(n, int) else [int(k) for k in n]  # type: ignore[union-attr]
    rows = [
        prompt_ids(tokenizer, p, image_token, image_token_id, ids, causal)
        for p, ids in zip(prompts, image, strict=True)
    ]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = 1
    return PromptBatch(ids, mask, torch.zeros_like(ids))
