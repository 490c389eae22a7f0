"""The vision-language model: image tower -> connector -> a transformers causal LM, PaliGemma-style."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from vision_tower import ImageProcessor, VisionTower
from vision_tower.checkpoint import strict_load
from vision_tower.layers import no_weight_decay_names
from vision_tower.sources import load_tower, processor_for

from . import formats, generation
from .base import Connector, Grid
from .decoder import CACHE_KWARG, ensure_image_token, load_decoder, load_tokenizer, output_cache
from .inputs import (
    ATTENTION,
    IGNORE_INDEX,
    check_layout_tokens,
    count_targets,
    decoder_masks,
    ignored_labels,
    image_block_ids,
    image_ids,
    positions,
)
from .layouts import CropShape, ImageLayout, LayoutConfig
from .parts import VLMParts, tower_grid
from .registry import build_connector
from .swap import swap_record, tower_facts
from .target_loss import target_loss_sum

PathLike = str | os.PathLike


@dataclass
class VLMOutput(ModelOutput):
    """``loss`` (next-token cross-entropy over the kept labels, fp32: their mean, or their sum over
    ``num_items_in_batch`` when given), ``logits`` (B, L, V),
    ``cache`` (the decoder's KV cache when ``use_cache``), ``image_tokens`` (sum of the images' tokens, E):
    every image's decoder tokens one after the other, as the image layout packs the connector's outputs."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: Any = None
    image_tokens: torch.Tensor | None = None


def _fixed_grid(tower: Any) -> VisionTower:
    """``tower`` if it gives a fixed token grid, which the connectors and the prompt layout expect."""
    if not isinstance(tower, VisionTower):
        kind = type(tower).__name__
        hint = (
            " (SigLIP 2 NaFlex: a grid per image and padded tokens); load a fixed-resolution tower instead, "
            "e.g. "
            "a SigLIP 2 checkpoint of fixed size"
            if "NaFlex" in kind
            else ""
        )
        raise ValueError(
            "a VisionLanguageModel needs a fixed-resolution VisionTower (its connector and prompts expect "
            "one "
            f"fixed token grid); got {kind}{hint}"
        )
    return tower


def _drop_head(tower: VisionTower) -> VisionTower:
    """The VLM reads patch features only: the pooling head would make the tower run every block."""
    if tower.head is not None:
        tower.head = None
        tower.config.use_head = False
    return tower


class VisionLanguageModel(nn.Module):
    """``tower`` (a :class:`VisionTower`, or a source for ``load_tower``) -> ``connector`` (a
    :class:`Connector` or a registered name, built from the tower's width to the decoder's) ->
    ``decoder`` (a transformers causal LM, or a folder / hub id loaded with ``AutoModelForCausalLM``).

    Called like transformers' PaliGemma. ``image_token_id`` marks the placeholders that the connector's
    outputs replace, in order; without it ``<image>`` is added (tokenizer and embedding table).
    ``attention="prefix"``: image tokens and prompt (``token_type_ids`` 0) attend to each other both
    ways, the suffix (1) causally, as PaliGemma; ``"causal"``: causal everywhere, as LLaVA;
    ``"image_bidirectional"``: causal, except that the tokens of each image attend to each other both ways
    (each image its own block, also next to another image), as Gemma 3 (transformers reads it from
    ``token_type_ids``; here the image placeholders and the layout's tokens per image give it).

    ``connector_options`` go to a connector given by name. ``dtype`` loads a decoder given by name in it and
    casts tower and connector. ``tokenizer`` (a transformers tokenizer; loaded with a decoder given by name)
    and ``processor`` (an :class:`ImageProcessor`) are used by ``generate`` with prompts and saved with the
    checkpoints. The pooling head of the tower is dropped: only patch features are read. ``tower_swap``:
    the record of the tower swap that made this model (:meth:`replace_tower` writes it; saved and loaded
    with the checkpoints); ``source``: the checkpoint it was loaded from, if any. ``chat_template``: the Jinja
    text that renders conversations for this model (training's ``model.chat_template``; default: the
    tokenizer's own), saved with the tokenizer and, in the LLaVA formats, as the processor's template.

    ``image_layout`` (a name of :func:`connectors.layouts.list_layouts`, or a :class:`LayoutConfig`) with
    ``layout_options``: how an image becomes crops and decoder tokens. ``"fixed"`` (the default): one crop,
    squashed to the tower's size; ``"anyres"`` (LLaVA-NeXT) and ``"anyres_max_9"`` (LLaVA-OneVision):
    a base image and tiles of the best-fit grid, whose tokens are packed with a learned ``image_newline``
    (``layout_params``, trained with the connector); ``"split"`` (Idefics3 / SmolVLM) and ``"pan_and_scan"``
    (Gemma 3): crops whose tokens go in order into placeholders between the layout's text (tile markers,
    image blocks), which the tokenizer must hold as special tokens (:meth:`image_prompt_ids`). Such images
    come as ``pixel_values`` of every crop (:meth:`image_inputs` makes them) with each image's
    ``image_sizes``.

    A NaFlex (variable-resolution) tower is refused: connectors and prompts expect a fixed token grid.

    A plain ``nn.Module``: the same graph runs on every rank, the parts are ``tower``, ``connector``
    and ``decoder``, and it can be built while an ``HfDeepSpeedConfig`` is alive.
    """

    def __init__(
        self,
        tower: VisionTower | PathLike,
        connector: Connector | str,
        decoder: PreTrainedModel | PathLike,
        *,
        image_token_id: int | None = None,
        attention: str = "prefix",
        connector_options: dict[str, Any] | None = None,
        tokenizer: Any | None = None,
        processor: ImageProcessor | None = None,
        dtype: torch.dtype | None = None,
        tower_swap: dict[str, Any] | None = None,
        image_layout: str | LayoutConfig = "fixed",
        layout_options: dict[str, Any] | None = None,
        chat_template: str | None = None,
    ) -> None:
        super().__init__()
        if attention not in ATTENTION:
            raise ValueError(f"attention must be one of {ATTENTION}, got {attention!r}")
        if isinstance(tower, (str, os.PathLike)):
            tower_src, tower = str(tower), load_tower(str(tower), dtype=dtype)
            processor = processor or processor_for(tower_src, tower.config.image_size)
        tower = _fixed_grid(tower)
        if isinstance(decoder, (str, os.PathLike)):
            tokenizer = tokenizer if tokenizer is not None else load_tokenizer(decoder)
            decoder = load_decoder(decoder, dtype=dtype)
        width = decoder.get_input_embeddings().embedding_dim
        if isinstance(connector, str):
            connector = build_connector(
                connector, tower.config.hidden_size, width, **(connector_options or {})
            )
        elif connector_options:
            raise ValueError("connector_options apply to a connector given by name")
        self.tower = _drop_head(tower)
        self.connector = connector
        self.decoder = decoder
        self._check_widths()
        self.attention = attention
        self.tokenizer = tokenizer
        self.processor = processor
        self.tower_swap = tower_swap
        self.source: str | None = None
        own = getattr(tokenizer, "chat_template", None)
        self.chat_template: str | None = chat_template or (own if isinstance(own, str) else None)
        self.image_token_id = ensure_image_token(decoder, tokenizer, image_token_id)
        if isinstance(image_layout, LayoutConfig):
            if layout_options:
                raise ValueError("layout_options apply to an image layout given by name")
            image_layout, layout_options = image_layout.name, image_layout.options
        self.layout = self._build_layout(
            LayoutConfig(image_layout, dict(layout_options or {})), self.tower, self.connector
        )
        if tokenizer is not None:
            check_layout_tokens(tokenizer, self.layout)
        ref = next(self.connector.parameters())
        self.layout_params = nn.ParameterDict(
            {
                name: nn.Parameter(torch.randn(shape, device=ref.device) / shape[-1] ** 0.5)
                for name, shape in self.layout.learned(width).items()
            }
        )
        if dtype is not None:
            self.tower.to(dtype)
            self.connector.to(dtype)
            self.layout_params.to(dtype)

    @staticmethod
    def _build_layout(config: LayoutConfig, tower: VisionTower, connector: Connector) -> ImageLayout:
        """The image layout ``config`` for ``tower``'s input size and ``connector``'s tokens per crop."""
        size = tower.config.image_size
        return config.build(CropShape.of(connector, (size, size), tower_grid(tower)))

    @property
    def image_layout(self) -> LayoutConfig:
        """The image layout's name and options (what builds it again)."""
        return self.layout.config

    def _check_widths(self) -> None:
        tower_w = self.tower.config.hidden_size
        dec_w = self.decoder.get_input_embeddings().embedding_dim
        c = self.connector
        if (c.in_dim, c.out_dim) != (tower_w, dec_w):
            raise ValueError(
                f"connector {c.name!r} maps {c.in_dim} -> {c.out_dim} but the tower gives {tower_w}-wide "
                f"features and the decoder embeds in {dec_w}: build it as build_connector({c.name!r}, "
                f"{tower_w}, {dec_w})"
            )

    # ----------------------------------------------------------------- facts
    @property
    def grid(self) -> Grid:
        """The tower's token grid at its configured image size."""
        return tower_grid(self.tower)

    @property
    def num_image_tokens(self) -> int:
        """Placeholders an image of the tower's own size takes in the prompt (with the ``fixed`` layout:
        every image; other layouts: see :meth:`tokens_for`)."""
        size = self.tower.config.image_size
        return self.layout.num_tokens((size, size))

    def tokens_for(self, image_size: Any) -> int:
        """Placeholders an image of ``image_size`` (height, width) takes in the prompt."""
        return self.layout.num_tokens(image_size)

    def image_prompt_ids(self, image_size: Any) -> list[int]:
        """The ids an image of ``image_size`` (height, width) takes in the prompt: its placeholders and,
        for the ``split`` and ``pan_and_scan`` layouts, the layout's text around them (Idefics3's tile
        markers, Gemma 3's ``<start_of_image>`` blocks), as transformers' processors write it."""
        return image_ids(self.tokenizer, self.layout.plan(image_size).prompt, self.image_token_id)

    def image_inputs(self, images: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``pixel_values`` of every crop of ``images`` (PIL images, arrays or files the processor reads),
        images in order, ``(sum of crops, 3, H, W)`` float32, and ``image_sizes`` ``(num_images, 2)``: the
        decoded (height, width) of each, which picks its crops and tokens. With the ``fixed`` layout the
        processor's own output, and the tower's size for every image (which is all that layout reads)."""
        processor = self.image_processor()
        if self.layout.name == "fixed":
            pixels = processor(images)  # (n, 3, H, W)
            size = self.tower.config.image_size
            return pixels, torch.tensor([[size, size]] * pixels.shape[0], dtype=torch.long).reshape(-1, 2)
        crops, sizes = [], []
        for image in images if isinstance(images, (list, tuple)) else [images]:
            pixels, size = self.layout.crops(image, processor)
            crops.append(pixels)
            sizes.append(size)
        return torch.cat(crops), torch.tensor(sizes, dtype=torch.long).reshape(-1, 2)

    def image_processor(self) -> ImageProcessor:
        """The processor the VLM was given or loaded with, else SigLIP's at the tower's size."""
        return self.processor or ImageProcessor(image_size=self.tower.config.image_size)

    # ----------------------------------------------------------------- training support
    def no_weight_decay(self) -> set[str]:
        """Names of parameters that should get no weight decay: biases, norms and other 0/1-d tensors, and
        what each sub-module names in its own ``no_weight_decay()`` (the tower's position table, the
        pooling probe, a resampler's learned queries): :func:`vision_tower.layers.no_weight_decay_names`."""
        return no_weight_decay_names(self, own=False)

    def set_trainable(self, *, tower: bool, connector: bool, decoder: bool) -> None:
        """``requires_grad`` per part (stage "align": connector only); the layout's parameters (LLaVA-NeXT's
        ``image_newline``) train with the connector."""
        for part, flag in ((self.tower, tower), (self.connector, connector), (self.decoder, decoder)):
            part.requires_grad_(flag)
        self.layout_params.requires_grad_(connector)

    def gradient_checkpointing_enable(self, *, tower: bool = True, decoder: bool = True) -> None:
        """Recompute tower blocks and decoder layers in the backward pass (non-reentrant checkpoints)."""
        self.tower.set_gradient_checkpointing(tower)
        if not decoder:
            return
        kwargs = {"use_reentrant": False}
        if hasattr(self.decoder, "activation_checkpointing_enable"):  # transformers >= 5.x name
            self.decoder.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            self.decoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    def gradient_checkpointing_disable(self) -> None:
        self.tower.set_gradient_checkpointing(False)
        if hasattr(self.decoder, "activation_checkpointing_disable"):
            self.decoder.activation_checkpointing_disable()
        else:
            self.decoder.gradient_checkpointing_disable()

    # ----------------------------------------------------------------- forward
    def image_embeddings(
        self,
        pixel_values: torch.Tensor | None = None,
        *,
        patch_features: torch.Tensor | None = None,
        grid: Grid | None = None,
    ) -> torch.Tensor | None:
        """Connector outputs of every crop (crops, T, E) from pixels (crops, 3, H, W) or from precomputed
        tower features (crops, N, D) on ``grid`` (a feature cache); None without images. With the ``fixed``
        layout a crop is an image."""
        if pixel_values is not None and patch_features is not None:
            raise ValueError("pass pixel_values or patch_features, not both")
        if pixel_values is not None:
            out = self.tower(pixel_values)
            patch_features, grid = out.patch_features, out.grid  # (crops, N, D)
        elif patch_features is None:
            return None
        elif grid is None:
            side = int(patch_features.shape[1] ** 0.5)
            if side * side != patch_features.shape[1]:
                raise ValueError(
                    f"patch_features of {patch_features.shape[1]} tokens are not square: pass grid=(h, w)"
                )
            grid = (side, side)
        dtype = next(self.connector.parameters()).dtype
        return self.connector(patch_features.to(dtype), grid)  # (crops, T, E)

    def image_tokens(
        self, crop_tokens: torch.Tensor, image_sizes: torch.Tensor | Any | None = None
    ) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """The connector outputs of every crop (crops, T, E), packed by the image layout into the images'
        decoder tokens (sum of tokens, E), and the (height, width) of each image. ``image_sizes``
        (num_images, 2) picks each image's crops and tokens; the ``fixed`` layout needs none (one crop per
        image)."""
        if self.layout.name == "fixed":  # one crop per image, its tokens as the connector gives them
            size = self.tower.config.image_size
            count = crop_tokens.shape[0] if image_sizes is None else len(image_sizes)
            if count != crop_tokens.shape[0]:
                raise ValueError(f"{count} image_sizes for {crop_tokens.shape[0]} images (layout 'fixed')")
            return crop_tokens.reshape(-1, crop_tokens.shape[-1]), [(size, size)] * count
        if image_sizes is None:
            raise ValueError(
                f"image layout {self.layout.name!r} needs image_sizes (num_images, 2) with the crops of "
                "every image: make both with vlm.image_inputs(images)"
            )
        sizes = [(int(h), int(w)) for h, w in torch.as_tensor(image_sizes).reshape(-1, 2).tolist()]
        if not sizes:  # a batch of text only: no token, but the layout's parameters stay in the graph (a
            # zero gradient), as every rank of ZeRO-2/3 must reduce the same parameters
            if crop_tokens.shape[0]:
                raise ValueError(f"{crop_tokens.shape[0]} crops without image_sizes")
            tokens = crop_tokens.reshape(0, crop_tokens.shape[-1])
            for param in self.layout_params.values():
                tokens = tokens + 0 * param.sum().to(tokens.dtype)
            return tokens, sizes
        tokens, _ = self.layout.pack(crop_tokens, sizes, dict(self.layout_params))
        return tokens, sizes

    def embed(
        self,
        input_ids: torch.Tensor,
        image_tokens: torch.Tensor | None,
        image_sizes: list[tuple[int, int]] | None = None,
    ) -> torch.Tensor:
        """Token embeddings (B, L, E) with the image placeholders replaced by ``image_tokens`` (sum of the
        images' tokens, E) in order; ``image_sizes`` (each image's (height, width)) name the image whose
        count differs from its placeholders."""
        is_image = input_ids == self.image_token_id  # (B, L)
        embeds = self.decoder.get_input_embeddings()(input_ids.masked_fill(is_image, 0))  # (B, L, E)
        found = int(is_image.sum())
        if image_tokens is not None:
            image_tokens = image_tokens.reshape(-1, image_tokens.shape[-1])
        given = 0 if image_tokens is None else image_tokens.shape[0]
        if found != given:
            raise ValueError(self._count_error(is_image.sum(-1).tolist(), given, image_sizes))
        if image_tokens is None:
            return embeds
        return embeds.masked_scatter(is_image.unsqueeze(-1), image_tokens.to(embeds.dtype))

    def _count_error(self, per_row: list[int], given: int, sizes: list[tuple[int, int]] | None) -> str:
        """Prompt placeholders against the images' tokens, naming the first image whose count differs."""
        head = f"input_ids hold {sum(per_row)} image tokens (id {self.image_token_id}; per row {per_row})"
        if not sizes:
            return f"{head} but no images were given"
        counts = [self.layout.num_tokens(s) for s in sizes]
        if len(sizes) == len(per_row):  # one image per row: name the row
            for i, (size, want, have) in enumerate(zip(sizes, counts, per_row, strict=True)):
                if want != have:
                    return (
                        f"{head} but the images give {given}: image {i} ({size[0]}x{size[1]}, layout "
                        f"{self.layout.name!r}) gives {want} image tokens, its prompt holds {have} "
                        "placeholders"
                    )
        listed = ", ".join(f"{h}x{w}: {n}" for (h, w), n in zip(sizes, counts, strict=True))
        return (
            f"{head} but the {len(sizes)} image(s) give {given} (layout {self.layout.name!r}; {listed}): put "
            "each image's ids in the prompt (vlm.image_prompt_ids(size): its placeholders and layout text)"
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        *,
        image_sizes: torch.Tensor | Any | None = None,
        patch_features: torch.Tensor | None = None,
        grid: Grid | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Any = None,
        use_cache: bool = False,
        logits_to_keep: int = 0,
        num_items_in_batch: float | torch.Tensor | None = None,
        targets_only: bool = False,
    ) -> VLMOutput:
        """``input_ids`` (B, L) with image placeholders; ``pixel_values`` (crops, 3, H, W) or precomputed
        ``patch_features`` (crops, N, D) on ``grid``, every crop of every image (one crop per image with the
        ``fixed`` layout), and ``image_sizes`` (num_images, 2) for the other layouts; ``attention_mask``
        (B, past + L), 0 on padding;
        ``token_type_ids`` (B, L), 0 on the prefix (image and prompt), 1 on the suffix; ``labels`` (B, L),
        ignored on image tokens, the prefix and padding. ``position_ids`` (B, L) on a prompt with nothing
        cached also say which tokens attend to which (transformers' packed format): a row may hold several
        samples, each with positions from 0 (the training data's ``data.packing``), and a token attends only
        within its own sample, by that sample's mask; ``attention_mask`` then marks the padding (kept out
        whatever its positions). Without them positions count the attended tokens. Without
        ``token_type_ids`` every token is prefix under prefix attention (a prompt to continue).
        ``num_items_in_batch`` (as in transformers): the loss is the sum over the kept labels divided by it
        instead of their mean, so that micro-batches and ranks holding different numbers of targets add up to
        the mean over the global batch (count them
        with :meth:`count_targets`). ``targets_only`` (with ``labels``; what training and evaluation use):
        ``lm_head`` (and the family's final soft-capping) runs only on the positions whose next token is a
        target, not on the image tokens, the prompt and the padding, and the cross-entropy is taken in
        chunks of positions recomputed in the backward pass (:mod:`connectors.target_loss`); the loss is the
        same, and no ``logits`` are returned."""
        B, L = input_ids.shape
        past = cache.get_seq_length() if cache is not None else 0
        if attention_mask is None:
            attention_mask = torch.ones((B, past + L), dtype=torch.long, device=input_ids.device)
        if attention_mask.shape != (B, past + L):
            raise ValueError(
                f"attention_mask is {tuple(attention_mask.shape)}; expected ({B}, {past + L}): cached {past} "
                f"+ new {L} tokens"
            )
        if token_type_ids is not None and token_type_ids.shape != input_ids.shape:
            raise ValueError(
                f"token_type_ids {tuple(token_type_ids.shape)} do not match input_ids "
                f"{tuple(input_ids.shape)}"
            )
        crops = self.image_embeddings(pixel_values, patch_features=patch_features, grid=grid)
        image_tokens, sizes = (None, None) if crops is None else self.image_tokens(crops, image_sizes)
        embeds = self.embed(input_ids, image_tokens, sizes)  # (B, L, E)
        packed = position_ids is not None and not past  # rows of several samples: positions restart at each
        if position_ids is None:
            position_ids = positions(attention_mask, L)  # (B, L)
        elif position_ids.shape != input_ids.shape:
            raise ValueError(
                f"position_ids {tuple(position_ids.shape)} do not match input_ids {tuple(input_ids.shape)}"
            )
        masks = decoder_masks(
            self.decoder,
            embeds,
            attention_mask,
            cache,
            position_ids,
            self._prefix(token_type_ids, labels, past, embeds),
            self._image_blocks(input_ids, sizes, past),
            packed=packed,
        )
        decoder_inputs = dict(
            inputs_embeds=embeds,
            attention_mask=masks,
            position_ids=position_ids,
            use_cache=use_cache,
            **{CACHE_KWARG: cache},
        )
        if targets_only and labels is not None:  # the decoder body, then the loss at the targets only
            out = self.decoder.get_decoder()(**decoder_inputs)
            mask = attention_mask[:, -L:]
            kept = ignored_labels(labels, input_ids, self.image_token_id, token_type_ids, mask)
            targets = kept[:, 1:]  # (B, L-1): the token each position predicts
            at = targets != IGNORE_INDEX
            loss = target_loss_sum(self.decoder, out.last_hidden_state[:, :-1][at], targets[at])
            loss = loss / (at.sum() if num_items_in_batch is None else num_items_in_batch)
            return VLMOutput(loss=loss, cache=output_cache(out), image_tokens=image_tokens)
        out = self.decoder(**decoder_inputs, logits_to_keep=logits_to_keep)
        loss = None
        if labels is not None:
            reduction = "mean" if num_items_in_batch is None else "sum"
            loss = self._loss(
                out.logits, labels, input_ids, token_type_ids, attention_mask[:, -L:], reduction
            )
            if num_items_in_batch is not None:
                loss = loss / num_items_in_batch
        return VLMOutput(loss=loss, logits=out.logits, cache=output_cache(out), image_tokens=image_tokens)

    def _prefix(
        self,
        token_type_ids: torch.Tensor | None,
        labels: torch.Tensor | None,
        past: int,
        embeds: torch.Tensor,
    ) -> torch.Tensor | None:
        """(B, L) True on tokens of the bidirectional prefix, or None (causal attention, or a decoding
        step)."""
        if self.attention != "prefix" or past:
            return None
        if token_type_ids is None:
            if labels is not None:
                raise ValueError(
                    "attention='prefix' with labels needs token_type_ids (0 on image and prompt, 1 on the "
                    "suffix the loss is computed on)"
                )
            return torch.ones(embeds.shape[:2], dtype=torch.bool, device=embeds.device)
        return token_type_ids == 0

    def _image_blocks(
        self, input_ids: torch.Tensor, sizes: list[tuple[int, int]] | None, past: int
    ) -> torch.Tensor | None:
        """(B, L) the image of each image token, -1 elsewhere, for ``image_bidirectional`` attention; None
        otherwise, without images, and on a decoding step (its token is text: causal, as transformers'
        Gemma 3 passes no ``token_type_ids`` after the prompt)."""
        if self.attention != "image_bidirectional" or past or not sizes:
            return None
        return image_block_ids(input_ids, self.image_token_id, [self.layout.num_tokens(s) for s in sizes])

    def _loss(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None,
        attention_mask: torch.Tensor,
        reduction: str = "mean",
    ) -> torch.Tensor:
        """The sum (``reduction="sum"``) or mean of the next-token cross-entropies over the kept labels."""
        if logits.shape[1] != labels.shape[1]:
            raise ValueError(
                f"labels need logits at every position: got {logits.shape[1]} of {labels.shape[1]} "
                "(logits_to_keep)"
            )
        kept = ignored_labels(labels, input_ids, self.image_token_id, token_type_ids, attention_mask)
        return F.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]),
            kept[:, 1:].reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction=reduction,
        )

    def count_targets(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> int:
        """How many next-token targets ``forward``'s loss averages over for these inputs (what to sum over
        micro-batches and ranks for ``num_items_in_batch``)."""
        return count_targets(
            ignored_labels(labels, input_ids, self.image_token_id, token_type_ids, attention_mask)
        )

    # ----------------------------------------------------------------- generation, parts, checkpoints
    def generate(
        self, pixel_values: torch.Tensor | None = None, prompts: list[str] | str | None = None, **options: Any
    ) -> torch.Tensor:
        """Greedy continuation with the KV cache: (B, T <= max_new_tokens) new ids, padded after eos.
        Options (``input_ids``, ``attention_mask``, ``token_type_ids``, ``patch_features``, ``grid``,
        ``max_new_tokens``, ``eos_token_id``): see :func:`connectors.generation.generate`."""
        return generation.generate(self, pixel_values, prompts, **options)

    def settings(self) -> dict[str, Any]:
        """The keyword arguments that rebuild this VLM's settings around the same or other parts:
        ``VisionLanguageModel(tower, connector, decoder, **vlm.settings())`` (image token, attention,
        tokenizer, processor, tower swap record, image layout and chat template; learned layout parameters
        start fresh)."""
        return {
            "image_token_id": self.image_token_id,
            "attention": self.attention,
            "tokenizer": self.tokenizer,
            "processor": self.processor,
            "tower_swap": self.tower_swap,
            "image_layout": self.image_layout,
            "chat_template": self.chat_template,
        }

    def replace_tower(
        self,
        tower: VisionTower,
        connector: Connector | str | None = None,
        *,
        processor: ImageProcessor | None = None,
        source: str | None = None,
        **options: Any,
    ) -> VisionLanguageModel:
        """Swap the image tower, keep the decoder (its tokenizer, image token id and attention), and put a
        freshly initialised connector of the new input width in front of it: ``connector`` by name (with
        ``options``), or the current kind and options; a :class:`Connector` is used as given (e.g.
        ``vlm.connector`` to keep the trained one when the widths allow). ``processor``: the new tower's
        preprocessing (default: the current one at the new tower's image size). ``source`` (where the new
        tower came from) goes into ``tower_swap``, the record of which tower replaced which, saved with
        the checkpoints."""
        tower = _fixed_grid(tower)
        width = self.decoder.get_input_embeddings().embedding_dim
        kept = connector is self.connector
        if connector is None:
            merged = {**self.connector.options, **options}
            connector = build_connector(self.connector.name, tower.config.hidden_size, width, **merged)
        elif isinstance(connector, str):
            connector = build_connector(connector, tower.config.hidden_size, width, **options)
        elif options:
            raise ValueError("options apply to a connector given by name")
        if (connector.in_dim, connector.out_dim) != (tower.config.hidden_size, width):
            raise ValueError(
                f"connector {connector.name!r} maps {connector.in_dim} -> {connector.out_dim}; the new tower "
                f"gives {tower.config.hidden_size}-wide features and the decoder embeds in {width}: let "
                "replace_tower build a fresh one (connector=None or a name)"
            )
        layout = self._build_layout(self.layout.config, tower, connector)  # new crop size, tokens per crop
        if self.tokenizer is not None:
            check_layout_tokens(self.tokenizer, layout)  # split: more tiles per side at a smaller crop
        before = tower_facts(self.tower, self.connector)
        previous = self.tower_swap["tower"] if self.tower_swap else None
        ref = next(self.connector.parameters())
        self.tower = _drop_head(tower)
        self.connector = connector.to(device=ref.device, dtype=ref.dtype)
        self._check_widths()
        self.layout = layout
        if processor is not None:
            self.processor = processor.with_image_size(tower.config.image_size)
        elif self.processor is not None:
            self.processor = self.processor.with_image_size(tower.config.image_size)
        self.tower_swap = swap_record(
            before,
            tower_facts(self.tower, self.connector),
            source=source,
            replaced_source=previous,
            checkpoint=self.source,
            connector="kept" if kept else "fresh",
        )
        return self

    def save_pretrained(
        self, out_dir: PathLike, *, format: str = "native", state_dict: dict[str, torch.Tensor] | None = None
    ) -> None:
        """Write the VLM as ``native`` (holds everything), ``paligemma``, ``llava`` (the ``fixed`` image
        layout), ``llava_next`` (``anyres``), ``llava_onevision`` (``anyres_max``), ``idefics3`` or
        ``smolvlm`` (``split``), ``gemma3`` (``fixed`` or ``pan_and_scan``, ``avg_pool``,
        ``image_bidirectional``): transformers' ``PaliGemmaForConditionalGeneration`` /
        ``Llava*ForConditionalGeneration`` / ``Idefics3`` / ``SmolVLMForConditionalGeneration`` /
        ``Gemma3ForConditionalGeneration`` and ``AutoProcessor`` load them, with the tokenizer and processor
        files when the VLM has them. ``state_dict`` (this module's names) replaces the live weights, e.g.
        weights consolidated from a ZeRO-3 run."""
        sd = self.state_dict() if state_dict is None else state_dict
        formats.save(self.parts(), out_dir, format=format, state_dict=sd)

    def parts(self) -> VLMParts:
        """Tower, connector, decoder, tokenizer, processor, image token id, attention and chat template (not
        copies)."""
        return VLMParts(
            self.tower,
            self.connector,
            self.decoder,
            self.image_token_id,
            self.attention,
            self.tokenizer,
            self.processor,
            self.tower_swap,
            self.layout.config,
            chat_template=self.chat_template,
        )

    @classmethod
    def from_pretrained(
        cls,
        src: PathLike,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        revision: str | None = None,
        cache_dir: PathLike | None = None,
    ) -> VisionLanguageModel:
        """A VLM from a folder or hub id in any of the formats (detected from config.json): the native
        layout, or a PaliGemma, LLaVA, LLaVA-NeXT, LLaVA-OneVision, Idefics3, SmolVLM or Gemma 3
        checkpoint with a SigLIP tower (the tiled ones with their image layout, LLaVA's with its
        ``image_newline``; Gemma 3 with ``pan_and_scan`` when its image processor pans and scans by default).
        ``dtype`` applies to every part; None keeps the decoder's saved dtype and float32 for tower and
        connector."""
        parts = formats.load(src, dtype=dtype, device=device, revision=revision, cache_dir=cache_dir)
        vlm = cls(
            parts.tower,
            parts.connector,
            parts.decoder,
            image_token_id=parts.image_token_id,
            attention=parts.attention,
            tokenizer=parts.tokenizer,
            processor=parts.processor,
            dtype=dtype,
            tower_swap=parts.tower_swap,
            image_layout=parts.layout,
            chat_template=parts.chat_template,
        )
        # the saved image_newline (the constructor drew a random one); a checkpoint without it is refused
        strict_load(vlm.layout_params, parts.layout_params, source=f"{src} (image layout parameters)")
        vlm.source = str(src)
        return vlm.to(device=device) if device is not None else vlm
