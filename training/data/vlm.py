"""Samples for a vision-language model: an image with a caption (``txt``, or ``caption``/``text`` in
``json``) or with a prompt and its answer (``json`` with ``prompt`` and ``answer``), laid out as the
VLM generates (:func:`connectors.inputs.prompt_ids`): the image placeholders and the prompt form the
prefix, the answer and eos the suffix, the loss is on the suffix only.

Rows have their own lengths; a batch is padded to its longest row (right padding). A row longer than
``max_length`` is cut on the answer side and counted as truncated; one whose image tokens and prompt
alone exceed it is skipped (``too_long``). The number of image tokens comes from each sample's own
token grid and image count, so tiled images (several crops per sample) fit the same collate.

A ``json`` holding a conversation (LLaVA's ``conversations`` or ``messages``, one image or several) is
rendered through the chat template and verified (:mod:`.chat`): the loss is on the assistant's tokens, the
token types are 0 up to the first reply. A row longer than ``max_length`` is cut (counted as truncated) as
long as its images and a reply token remain, else skipped (``too_long``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from connectors.base import ConnectorConfig, Grid
from connectors.inputs import IGNORE_INDEX, prompt_ids, text_ids

from .chat import ChatEncoder, is_conversation, place_images, read_conversation, resolve_chat_template
from .json_source import image_blobs
from .shards import SkipSample, default_decode_image, read_caption, read_image, read_json_member


def read_prompt_answer(sample: dict[str, Any], caption_prompt: str) -> tuple[str, str]:
    """(prompt, answer) of a raw sample: ``prompt``/``answer`` of its ``json``, else
    (``caption_prompt``, its caption)."""
    meta = None
    if "json" in sample:
        try:
            meta = read_json_member(sample)
        except SkipSample:
            if "txt" not in sample:
                raise
    if isinstance(meta, dict) and "answer" in meta:
        prompt, answer = meta.get("prompt", ""), meta["answer"]
        for name, value in (("prompt", prompt), ("answer", answer)):
            if not isinstance(value, str):
                raise SkipSample("bad_caption", f"json {name} is a {type(value).__name__}, not a string")
        if not answer.strip():
            raise SkipSample("empty_caption", "json answer is empty or whitespace")
        return prompt.strip(), answer.strip()
    return caption_prompt, read_caption(sample)


class ImageTokens:
    """How many decoder tokens an image of a given grid becomes: the connector's ``num_tokens``, from its
    config (built on the meta device, so nothing heavy travels to DataLoader workers)."""

    def __init__(self, connector: ConnectorConfig) -> None:
        self.config = connector
        self._connector = None

    def __call__(self, grid: Grid) -> int:
        if self._connector is None:
            with torch.device("meta"):
                self._connector = self.config.build()
        return self._connector.num_tokens(grid)

    def __getstate__(self) -> dict[str, Any]:
        return {"config": self.config, "_connector": None}


class PixelImages:
    """Images decoded and preprocessed for the tower: ``(n, 3, H, W)`` and the token grid."""

    batch_key = "pixel_values"

    def __init__(
        self,
        processor: Callable[[Image.Image], torch.Tensor],
        patch_size: int,
        decode_image: Callable[[bytes], Image.Image] = default_decode_image,
    ) -> None:
        self.processor, self.patch_size, self.decode_image = processor, patch_size, decode_image

    def load(self, sample: dict[str, Any]) -> tuple[torch.Tensor, Grid]:
        return self._pixels([read_image(sample, self.decode_image)])

    def load_blobs(self, blobs: list[bytes]) -> tuple[torch.Tensor, Grid]:
        """Several encoded images of one sample: ``(n, 3, H, W)``, each preprocessed alike."""
        images = []
        for i, blob in enumerate(blobs):
            try:
                images.append(self.decode_image(blob))
            except Exception as exn:  # the decoder's own error (ImageLoadError) or PIL's
                raise SkipSample("bad_image", f"image {i}: {exn!r}") from exn
        return self._pixels(images)

    def _pixels(self, images: list[Image.Image]) -> tuple[torch.Tensor, Grid]:
        try:
            pixels = torch.cat([_batched(self.processor(image)) for image in images])  # (n, 3, H, W)
        except Exception as exn:
            raise SkipSample("transform", repr(exn)) from exn
        p = self.patch_size
        return pixels, (pixels.shape[-2] // p, pixels.shape[-1] // p)


def _batched(pixels: torch.Tensor) -> torch.Tensor:
    return pixels[None] if pixels.dim() == 3 else pixels


@dataclass
class VLMItem:
    key: str
    images: torch.Tensor  # (n, 3, H, W) pixels or (n, N, D) tower features
    grid: Grid
    input_ids: list[int]
    num_prefix: int  # image tokens and prompt; the rest is the answer
    prompt: str
    text: str  # the answer (or caption) in full, as the reference for evaluation
    truncated: bool = False
    targets: list[bool] | None = None  # a conversation's: True on the assistant's tokens (else the suffix)
    prompt_ids: list[int] | None = None  # a conversation's ids up to its first reply (for evaluation)


class VLMBuilder:
    """Raw sample -> :class:`VLMItem` with ``tokenizer`` (a transformers tokenizer holding the image
    token), and items -> a batch of ``input_ids``, ``attention_mask``, ``token_type_ids``, ``labels``
    (each (B, L), L the longest row), ``pixel_values`` (B_img, 3, H, W) or ``patch_features``
    (B_img, N, D) with ``grid``, and the texts (``prompt``, ``answer``, ``__key__``).

    ``images`` gives each sample's images (:class:`PixelImages`, or a feature cache's reader);
    ``image_tokens(grid)`` the decoder tokens per image; ``caption_prompt`` the prompt of captions;
    ``causal``: a prompt without the image token is laid out as LLaVA's (bos, image, text), else as
    PaliGemma's (image, bos, text, newline). ``chat_template`` (Jinja text) renders conversations; none:
    a conversation sample is an error."""

    truncation_advice = (
        "image tokens, prompt and answer exceed data.max_length, so the answer was cut: raise data.max_length"
    )

    def __init__(
        self,
        tokenizer: Any,
        *,
        image_token_id: int,
        image_tokens: Callable[[Grid], int],
        images: Any,
        max_length: int,
        caption_prompt: str = "",
        causal: bool = False,
        chat_template: str | None = None,
    ) -> None:
        if tokenizer.eos_token_id is None:
            raise ValueError("the decoder's tokenizer has no eos token: answers need one to end")
        self.tokenizer, self.image_token_id, self.image_tokens = tokenizer, image_token_id, image_tokens
        self.images, self.max_length, self.caption_prompt = images, max_length, caption_prompt
        self.causal = causal  # a prompt without the image token: LLaVA's layout, not PaliGemma's
        self.image_token = tokenizer.convert_ids_to_tokens(image_token_id)
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else tokenizer.eos_token_id)
        self.chat_template = chat_template

    @functools.cached_property
    def chat(self) -> ChatEncoder:
        if self.chat_template is None:
            raise ValueError(
                "the data holds conversations but the decoder's tokenizer has no chat template: set "
                "model.chat_template (plain, v1 or a Jinja file)"
            )
        return ChatEncoder(self.tokenizer, self.chat_template, self.image_token)

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "chat"}  # rebuilt where it is used

    @functools.cached_property
    def longest_piece(self) -> int:
        """Characters of the tokenizer's longest vocabulary entry."""
        return max(map(len, self.tokenizer.get_vocab()))

    def prefix_ids(self, prompt: str, num_image_tokens: int) -> list[int]:
        """Image placeholders and prompt, as the VLM's ``generate`` lays them out."""
        return prompt_ids(
            self.tokenizer, prompt, self.image_token, self.image_token_id, num_image_tokens, self.causal
        )

    def build(self, sample: dict[str, Any]) -> VLMItem:
        meta = None
        if "json" in sample:
            try:
                meta = read_json_member(sample)
            except SkipSample:
                meta = None
            if is_conversation(meta):
                return self.build_conversation(sample, meta)
        prompt, answer = read_prompt_answer(sample, self.caption_prompt)
        if "__folder__" in sample:  # a JSON source: the image named by the record, in the image folder
            names = meta.get("image", meta.get("images", [])) if isinstance(meta, dict) else []
            images, grid = self.images.load_blobs(
                image_blobs(sample, [names] if isinstance(names, str) else names)
            )
        else:
            images, grid = self.images.load(sample)  # (n, ...)
        try:  # a prompt holding <image> twice: this sample's own text, skipped and counted like bad json
            prefix = self.prefix_ids(prompt, self.image_tokens(grid) * images.shape[0])
        except ValueError as err:
            raise SkipSample("bad_caption", str(err)) from None
        room = self.max_length - len(prefix)
        if room < 1:  # before the answer is tokenized: it could not be used
            raise SkipSample(
                "too_long",
                f"image tokens and prompt take {len(prefix)} tokens, data.max_length is {self.max_length}",
            )
        # no token covers more characters than the vocabulary's longest piece, so only the first
        # (room + 1) x that many characters can reach the row (twice that, for the merges at the cut): a
        # caption of megabytes is cut before the tokenizer reads it, and counted as truncated
        keep = 2 * (room + 1) * self.longest_piece
        try:  # text spelling a special token that a tokenizer without an unknown token cannot read as text
            suffix = text_ids(self.tokenizer, answer[:keep]) + [self.tokenizer.eos_token_id]
        except ValueError as err:
            raise SkipSample("bad_caption", str(err)) from None
        return VLMItem(
            sample["__key__"],
            images,
            grid,
            prefix + suffix[:room],
            len(prefix),
            prompt,
            answer,
            len(suffix) > room or len(answer) > keep,
        )

    def build_conversation(self, sample: dict[str, Any], meta: dict[str, Any]) -> VLMItem:
        """A conversation's row: rendered, verified, its assistant tokens the targets."""
        conv = read_conversation(meta, self.image_token)
        key = str(meta.get("id", sample["__key__"]))
        blobs = image_blobs(sample, conv.images)
        if not blobs:
            raise SkipSample(
                "missing_image", "a conversation without an image (text-only samples are not trained)"
            )
        if not hasattr(self.images, "load_blobs"):
            raise ValueError("conversation samples read their images themselves: drop data.feature_cache")
        images, grid = self.images.load_blobs(blobs)  # (n, 3, H, W)
        messages = place_images(conv.messages, len(blobs), self.image_token)
        image = [self.image_token_id] * self.image_tokens(grid)
        enc = self.chat.encode(key, messages, lambda k: image)
        ids, targets = enc.ids, enc.targets
        if not any(targets):
            raise SkipSample("bad_conversation", f"sample {key}: the chat template marks no assistant token")
        first = targets.index(True)
        last_image = max(i for i, t in enumerate(ids) if t == self.image_token_id)
        if max(first, last_image) >= self.max_length:
            raise SkipSample(
                "too_long",
                f"its images and the text before the first reply take {max(first, last_image) + 1} tokens, "
                f"data.max_length is {self.max_length}",
            )
        reply = next(m["content"] for m in messages if m["role"] == "assistant")
        prompt = next((m["content"] for m in messages if m["role"] == "user"), "")
        return VLMItem(
            key,
            images,
            grid,
            ids[: self.max_length],
            first,
            prompt,
            reply,
            len(ids) > self.max_length,
            targets[: self.max_length],
            ids[:first] if last_image < first else None,
        )

    def collate(self, items: list[VLMItem]) -> dict[str, Any]:
        grids = {it.grid for it in items}
        shapes = {tuple(it.images.shape[1:]) for it in items}
        if len(grids) > 1 or len(shapes) > 1:
            raise ValueError(
                f"a batch holds images of different token grids {sorted(grids)} or shapes {sorted(shapes)}; "
                "resize every image to the tower's size"
            )
        width = max(len(it.input_ids) for it in items)
        ids = torch.full((len(items), width), self.pad_id, dtype=torch.long)  # (B, L)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        types = torch.ones((len(items), width), dtype=torch.long)
        targets = torch.ones((len(items), width), dtype=torch.bool)  # the suffix, or a conversation's replies
        for i, it in enumerate(items):
            n = len(it.input_ids)
            ids[i, :n] = torch.tensor(it.input_ids)
            mask[i, :n] = 1
            types[i, : it.num_prefix] = 0
            if it.targets is not None:
                targets[i, :n] = torch.tensor(it.targets)
        labels = ids.masked_fill((types == 0) | (mask == 0) | ~targets, IGNORE_INDEX)
        batch = {
            "input_ids": ids,
            "attention_mask": mask,
            "token_type_ids": types,
            "labels": labels,
            self.images.batch_key: torch.cat([it.images for it in items]),  # (B_img, ...)
            "grid": items[0].grid,
            "prompt": [it.prompt for it in items],
            "answer": [it.text for it in items],
            "__key__": [it.key for it in items],
        }
        if any(it.targets is not None for it in items):
            # what evaluation continues: a conversation's ids up to its first reply, a single-turn sample's
            # prefix (the ids its prompt string gives)
            batch["prompt_ids"] = [
                it.input_ids[: it.num_prefix] if it.targets is None else it.prompt_ids for it in items
            ]
        return batch


def builder_for(
    vlm: Any,
    *,
    max_length: int,
    caption_prompt: str = "",
    images: Any = None,
    chat_template: str | None = None,
    key: str = "data.max_length",
) -> VLMBuilder:
    """The :class:`VLMBuilder` of a :class:`~connectors.VisionLanguageModel`: its tokenizer, image token and
    connector, and its image processor (or ``images``, e.g. a feature cache). ``chat_template``: a built-in
    name, a Jinja file, or None for the tokenizer's own (:func:`.chat.resolve_chat_template`). ``key`` names
    ``max_length`` where it is refused (``--max-length`` on ``eval vlm``'s command line)."""
    if vlm.tokenizer is None:
        raise ValueError("the VLM has no tokenizer: build it with one (or save its tokenizer files with it)")
    per_image = vlm.num_image_tokens
    if max_length < per_image + 2:
        raise ValueError(f"{key} {max_length} leaves no room for text: one image takes {per_image} tokens")
    if images is None:
        images = PixelImages(vlm.image_processor(), vlm.tower.config.patch_size)
    builder = VLMBuilder(
        vlm.tokenizer,
        image_token_id=vlm.image_token_id,
        image_tokens=ImageTokens(vlm.connector.config),
        images=images,
        max_length=max_length,
        caption_prompt=caption_prompt,
        causal=vlm.attention == "causal",
        chat_template=resolve_chat_template(chat_template, vlm.tokenizer),
    )
    prefix = len(builder.prefix_ids(caption_prompt, per_image))  # image tokens, bos, prompt, newline
    if max_length <= prefix:
        raise ValueError(
            f"{key} {max_length} leaves no room for a caption: one image and the caption prompt "
            f"take {prefix} tokens ({per_image} image tokens), so every caption sample would be skipped; "
            f"raise {key} above {prefix}"
        )
    return builder
