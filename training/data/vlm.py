"""Samples for a vision-language model: an image with a caption (``txt``, or ``caption``/``text`` in
``json``) or with a prompt and its answer (``json`` with ``prompt`` and ``answer``), laid out as the
VLM generates (:func:`connectors.inputs.prompt_ids`): the image placeholders and the prompt form the
prefix, the answer and eos the suffix, the loss is on the suffix only.

Rows have their own lengths; a batch is padded to its longest row (right padding). A row longer than
``max_length`` is cut on the answer side and counted as truncated; one whose image tokens and prompt
alone exceed it is skipped (``too_long``). Each image takes the placeholders the model's image layout gives
its size (``layout.num_tokens``: one crop's tokens with ``fixed``; with ``anyres`` a base crop, the tiles
of the grid that fits the image and a newline per row), with the layout's text around them (``split``:
Idefics3's tile markers; ``pan_and_scan``: Gemma 3's image blocks), so ``max_length`` counts each row's real
tokens;
a sample whose images take more than ``max_image_tokens`` is skipped (``too_many_image_tokens``): an image
is never cut. A batch carries every crop of its images in order and each image's size (``image_sizes``).

A ``json`` holding a conversation (LLaVA's ``conversations`` or ``messages``, one image, several or none) is
rendered through the chat template and verified (:mod:`.chat`): the loss is on the assistant's tokens, the
token types are 0 up to the first reply. A row longer than ``max_length`` is cut (counted as truncated) as
long as its images and a reply token remain, else skipped (``too_long``). A text-only conversation has no
crop in the batch; the model still runs its tower and connector on the batch's (maybe empty) crops, so that
every rank of ZeRO-3 takes part in every gather.
"""

from __future__ import annotations

import functools
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from PIL import Image

from connectors.base import Grid
from connectors.inputs import IGNORE_INDEX, image_ids, prompt_ids, text_ids
from connectors.layouts import ImageLayout
from vision_tower import ImageProcessor

from .chat import ChatEncoder, is_conversation, place_images, read_conversation, resolve_chat_template
from .json_source import image_blobs
from .shards import SkipSample, default_decode_image, read_caption, read_image, read_json_member


def prompt_fields(template: str) -> list[str]:
    """The ``json`` fields a caption prompt names in braces (``"{class}"``: the sample's ``class``); a
    field that is not a plain name (``{a.b}``, ``{0}``, ``{x!r}``, ``{x:>4}``) is an error."""
    names = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as err:
        raise ValueError(f"data.caption_prompt {template!r}: {err} (write a brace as {{{{ or }}}})") from None
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if not name.isidentifier() or spec or conversion:
            raise ValueError(
                f"data.caption_prompt {template!r}: {{{name}{'!' + conversion if conversion else ''}"
                f"{':' + spec if spec else ''}}} is not a json field name; write {{field}}"
            )
        names.append(name)
    return names


def fill_prompt(template: str, meta: Any) -> str:
    """A caption prompt with the sample's ``json`` fields it names filled in (a sample without one of them,
    as a string, is skipped as ``bad_caption``)."""
    fields = prompt_fields(template)
    if not fields:
        return template
    missing = [f for f in fields if not (isinstance(meta, dict) and isinstance(meta.get(f), str))]
    if missing:
        raise SkipSample(
            "bad_caption",
            f"data.caption_prompt {template!r} names json field {missing[0]!r}: the sample has none",
        )
    return template.format_map({f: meta[f] for f in fields})


def read_prompt_answer(sample: dict[str, Any], caption_prompt: str) -> tuple[str, str]:
    """(prompt, answer) of a raw sample: ``prompt``/``answer`` of its ``json``, else
    (``caption_prompt``, its caption), the prompt's ``{field}`` names filled from the ``json``."""
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
    return fill_prompt(caption_prompt, meta), read_caption(sample)


Size = tuple[int, int]  # (height, width)


class Images(NamedTuple):
    """What a sample's images give the model: ``values`` (every crop of every image in order: pixels
    ``(crops, 3, H, W)``, or cached tower features ``(crops, N, D)``), the tower's token ``grid`` of a crop,
    and each image's (height, width), which picks its crops and decoder tokens."""

    values: torch.Tensor
    grid: Grid
    sizes: list[Size]


class PixelImages:
    """Images decoded and cut into crops for the tower by the image ``layout`` (an
    :class:`~connectors.layouts.ImageLayout`, picklable for the loader's workers) with ``processor``'s
    numerics: ``fixed`` gives the processor's own ``(1, 3, H, W)`` per image (and the tower's size as the
    image's), a tiled layout its crops and the decoded image's size."""

    batch_key = "pixel_values"

    def __init__(
        self,
        processor: ImageProcessor,
        layout: ImageLayout,
        patch_size: int,
        decode_image: Callable[[bytes], Image.Image] = default_decode_image,
    ) -> None:
        if tuple(processor.size) != layout.crop.size:
            raise ValueError(
                f"image layout {layout.name!r} counts tokens of {layout.crop.size[0]}x{layout.crop.size[1]} "
                f"crops; the processor makes {processor.size[0]}x{processor.size[1]} images: give the "
                "model's own processor and layout (vlm.image_processor(), vlm.layout)"
            )
        self.processor, self.layout, self.patch_size = processor, layout, patch_size
        self.decode_image = decode_image

    def load(self, sample: dict[str, Any]) -> Images:
        return self._pixels([read_image(sample, self.decode_image)])

    def empty(self) -> Images:
        """No image (a text-only sample): no crop, on the tower's grid, so that it batches with the others."""
        h, w = self.layout.crop.size
        p = self.patch_size
        return Images(torch.zeros((0, 3, h, w)), (h // p, w // p), [])

    def load_blobs(self, blobs: list[bytes]) -> Images:
        """Several encoded images of one sample, each cut into its own crops."""
        images = []
        for i, blob in enumerate(blobs):
            try:
                images.append(self.decode_image(blob))
            except Exception as exn:  # the decoder's own error (ImageLoadError) or PIL's
                raise SkipSample("bad_image", f"image {i}: {exn!r}") from exn
        return self._pixels(images)

    def _pixels(self, images: list[Image.Image]) -> Images:
        crops, sizes = [], []
        try:
            for image in images:
                if self.layout.name == "fixed":  # the processor's resize, bit for bit as before layouts
                    crops.append(_batched(self.processor(image)))  # (1, 3, H, W)
                    sizes.append(self.layout.crop.size)
                else:
                    pixels, size = self.layout.crops(image, self.processor)  # (n, 3, H, W)
                    crops.append(pixels)
                    sizes.append(size)
            pixels = torch.cat(crops)  # (crops, 3, H, W)
        except Exception as exn:
            raise SkipSample("transform", repr(exn)) from exn
        p = self.patch_size
        return Images(pixels, (pixels.shape[-2] // p, pixels.shape[-1] // p), sizes)


def _batched(pixels: torch.Tensor) -> torch.Tensor:
    return pixels[None] if pixels.dim() == 3 else pixels


@dataclass
class VLMItem:
    key: str
    images: torch.Tensor  # (crops, 3, H, W) pixels or (crops, N, D) tower features, every image's crops
    grid: Grid
    image_sizes: list[Size]  # (height, width) of each image
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
    (each (B, L), L the longest row), ``pixel_values`` (crops, 3, H, W) or ``patch_features``
    (crops, N, D) with ``grid``: every crop of the batch's images in order, ``image_sizes``
    (num_images, 2), and the texts (``prompt``, ``answer``, ``__key__``).

    ``images`` gives each sample's images (:class:`PixelImages`, or a feature cache's reader) as
    :class:`Images`; ``layout`` (the model's image layout) the decoder tokens of each image's size;
    ``max_image_tokens`` (None: no limit) the most a sample's images may take; ``caption_prompt`` the prompt
    of captions;
    ``causal``: a prompt without the image token is laid out as LLaVA's (bos, image, text), else as
    PaliGemma's (image, bos, text, newline). ``chat_template`` (Jinja text) renders conversations; none:
    a conversation sample is an error. ``text_only`` (stage ``text``): every sample's rows as without its
    images (never read): no placeholder, no crop, a conversation's ``<image>`` dropped from its text."""

    truncation_advice = (
        "image tokens, prompt and answer exceed data.max_length, so the answer was cut: raise data.max_length"
    )

    def __init__(
        self,
        tokenizer: Any,
        *,
        image_token_id: int,
        layout: ImageLayout,
        images: Any,
        max_length: int,
        max_image_tokens: int | None = None,
        caption_prompt: str = "",
        causal: bool = False,
        chat_template: str | None = None,
        text_only: bool = False,
    ) -> None:
        if tokenizer.eos_token_id is None:
            raise ValueError("the decoder's tokenizer has no eos token: answers need one to end")
        self.tokenizer, self.image_token_id, self.layout = tokenizer, image_token_id, layout
        self.images, self.max_length, self.caption_prompt = images, max_length, caption_prompt
        self.max_image_tokens = max_image_tokens
        self.causal = causal  # a prompt without the image token: LLaVA's layout, not PaliGemma's
        self.image_token = tokenizer.convert_ids_to_tokens(image_token_id)
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else tokenizer.eos_token_id)
        self.chat_template = chat_template
        self.text_only = text_only

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

    def prefix_ids(self, prompt: str, image: int | list[int]) -> list[int]:
        """Images and prompt, as the VLM's ``generate`` lays them out; ``image``: the images' ids
        (:meth:`image_ids`) or a count of placeholders."""
        return prompt_ids(self.tokenizer, prompt, self.image_token, self.image_token_id, image, self.causal)

    def image_ids(self, size: Sequence[int]) -> list[int]:
        """An image's ids in the prompt: the layout's placeholders and text for its size."""
        return image_ids(self.tokenizer, self.layout.plan(size).prompt, self.image_token_id)

    def image_counts(self, images: Images) -> list[int]:
        """Decoder tokens of each image (the layout's count for its size); a sample whose images take more
        than ``max_image_tokens`` is skipped (``too_many_image_tokens``)."""
        counts = [self.layout.num_tokens(size) for size in images.sizes]
        if self.max_image_tokens is not None and sum(counts) > self.max_image_tokens:
            sizes = ", ".join(f"{h}x{w}: {n}" for (h, w), n in zip(images.sizes, counts, strict=True))
            raise SkipSample(
                "too_many_image_tokens",
                f"its images take {sum(counts)} decoder tokens ({sizes}; layout {self.layout.name!r}), "
                f"data.max_image_tokens is {self.max_image_tokens}",
            )
        return counts

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
        if self.text_only:
            images = self.images.empty()
        elif "__folder__" in sample:  # a JSON source: the image named by the record, in the image folder
            names = meta.get("image", meta.get("images", [])) if isinstance(meta, dict) else []
            images = self.images.load_blobs(image_blobs(sample, [names] if isinstance(names, str) else names))
        else:
            images = self.images.load(sample)
        self.image_counts(images)  # skips a sample over max_image_tokens
        spans = [i for size in images.sizes for i in self.image_ids(size)]  # the images one after the other
        if self.text_only:
            prompt = prompt.replace(self.image_token, "")
        try:  # a prompt holding <image> twice: this sample's own text, skipped and counted like bad json
            prefix = self.prefix_ids(prompt, spans)
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
            images.values,
            images.grid,
            images.sizes,
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
        if self.text_only:  # the text as if there were no image
            conv.images = []
            for m in conv.messages:
                m["content"] = m["content"].replace(self.image_token + "\n", "").replace(self.image_token, "")
        if not hasattr(self.images, "load_blobs"):
            raise ValueError("conversation samples read their images themselves: drop data.feature_cache")
        blobs = [] if self.text_only else image_blobs(sample, conv.images)
        # (crops, 3, H, W); a text-only conversation has none and still batches with the others
        images = self.images.load_blobs(blobs) if blobs else self.images.empty()
        self.image_counts(images)  # skips a sample over max_image_tokens
        messages = place_images(conv.messages, len(blobs), self.image_token)
        enc = self.chat.encode(key, messages, lambda k: self.image_ids(images.sizes[k]))
        ids, targets = enc.ids, enc.targets
        if not any(targets):
            raise SkipSample("bad_conversation", f"sample {key}: the chat template marks no assistant token")
        first = targets.index(True)
        last_image = max((i for i, t in enumerate(ids) if t == self.image_token_id), default=-1)
        if max(first, last_image) >= self.max_length:
            what = ("its images and " if blobs else "") + "the text before the first reply"
            raise SkipSample(
                "too_long",
                f"{what} take {max(first, last_image) + 1} tokens, data.max_length is {self.max_length}",
            )
        reply = next(m["content"] for m in messages if m["role"] == "assistant")
        prompt = next((m["content"] for m in messages if m["role"] == "user"), "")
        return VLMItem(
            key,
            images.values,
            images.grid,
            images.sizes,
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
        sizes = [size for it in items for size in it.image_sizes]
        batch = {
            "input_ids": ids,
            "attention_mask": mask,
            "token_type_ids": types,
            "labels": labels,
            self.images.batch_key: torch.cat([it.images for it in items]),  # (crops, ...)
            "image_sizes": torch.tensor(sizes, dtype=torch.long).reshape(-1, 2),  # (num_images, 2)
            "grid": items[0].grid,
            "prompt": [it.prompt for it in items],
            "answer": [it.text for it in items],
            "__key__": [it.key for it in items],
        }
        if any(it.targets is not None or not it.image_sizes for it in items):
            # what evaluation continues: a conversation's ids up to its first reply, a single-turn sample's
            # prefix (the ids its prompt string gives; without its image in stage text)
            batch["prompt_ids"] = [
                it.input_ids[: it.num_prefix] if it.targets is None else it.prompt_ids for it in items
            ]
        return batch


def builder_for(
    vlm: Any,
    *,
    max_length: int,
    max_image_tokens: int | None = None,
    caption_prompt: str = "",
    images: Any = None,
    chat_template: str | None = None,
    key: str = "data.max_length",
    text_only: bool = False,
) -> VLMBuilder:
    """The :class:`VLMBuilder` of a :class:`~connectors.VisionLanguageModel`: its tokenizer, image token and
    image layout, and its image processor (or ``images``, e.g. a feature cache). ``chat_template``: a built-in
    name or a Jinja file (:func:`.chat.resolve_chat_template`), or None for the VLM's own
    (``vlm.chat_template``: the one it was trained and saved with, else its tokenizer's). ``key`` names
    ``max_length`` where it is refused (``--max-length`` on ``eval vlm``'s command line)."""
    if vlm.tokenizer is None:
        raise ValueError("the VLM has no tokenizer: build it with one (or save its tokenizer files with it)")
    per_image = vlm.num_image_tokens  # an image of the tower's own size
    if max_length < per_image + 2:
        raise ValueError(f"{key} {max_length} leaves no room for text: one image takes {per_image} tokens")
    if vlm.layout.name == "fixed" and max_image_tokens is not None and max_image_tokens < per_image:
        raise ValueError(
            f"data.max_image_tokens {max_image_tokens} is below the {per_image} tokens every image takes "
            "(image layout 'fixed'): every sample would be skipped; raise it"
        )
    if images is None:
        images = PixelImages(vlm.image_processor(), vlm.layout, vlm.tower.config.patch_size)
    builder = VLMBuilder(
        vlm.tokenizer,
        image_token_id=vlm.image_token_id,
        layout=vlm.layout,
        images=images,
        max_length=max_length,
        max_image_tokens=max_image_tokens,
        caption_prompt=caption_prompt,
        causal=vlm.attention != "prefix",  # causal and Gemma 3's image attention: LLaVA's layout
        chat_template=resolve_chat_template(chat_template, vlm.tokenizer)
        if chat_template
        else vlm.chat_template,
        text_only=text_only,
    )
    size = vlm.tower.config.image_size
    prefix = len(builder.prefix_ids(caption_prompt, builder.image_ids((size, size))))  # image, bos, prompt
    if max_length <= prefix:
        raise ValueError(
            f"{key} {max_length} leaves no room for a caption: one image and the caption prompt "
            f"take {prefix} tokens ({per_image} image tokens), so every caption sample would be skipped; "
            f"raise {key} above {prefix}"
        )
    return builder
