"""transformers' LLaVA-NeXT / LLaVA-OneVision processors and packing, built locally from a word-level
tokenizer (nothing downloaded), for the image-layout parity tests."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from transformers import PreTrainedTokenizerFast

from training.demo.decoders import word_tokenizer

IMAGE = "<image>"


def image_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer with ``<image>`` as a special token."""
    return word_tokenizer(["hi"], extra_tokens=[IMAGE])


def _image_processor(cls_name: str, backend: str, tile: int, pinpoints: list[list[int]]):
    import transformers

    name = cls_name + ("Pil" if backend == "pil" else "")
    return getattr(transformers, name)(
        image_grid_pinpoints=pinpoints,
        size={"height": tile, "width": tile},
        crop_size={"height": tile, "width": tile},
        do_center_crop=False,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        resample=3,  # bicubic, SigLIP's
    )


def llava_next_processor(backend: str, tile: int, patch: int, pinpoints: list[list[int]]):
    """``LlavaNextProcessor`` for a SigLIP tower (no CLS: strategy "full") with ``backend``'s image
    processor ("torchvision": ``LlavaNextImageProcessor``, "pil": ``LlavaNextImageProcessorPil``)."""
    from transformers import LlavaNextProcessor

    return LlavaNextProcessor(
        image_processor=_image_processor("LlavaNextImageProcessor", backend, tile, pinpoints),
        tokenizer=image_tokenizer(),
        patch_size=patch,
        vision_feature_select_strategy="full",
    )


def llava_onevision_processor(
    backend: str, tile: int, patch: int, pinpoints: list[list[int]], max_tiles: int
):
    """``LlavaOnevisionProcessor`` with ``anyres_max_{max_tiles}`` and ``backend``'s image processor."""
    from transformers import LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor

    return LlavaOnevisionProcessor(
        image_processor=_image_processor("LlavaOnevisionImageProcessor", backend, tile, pinpoints),
        tokenizer=image_tokenizer(),
        video_processor=LlavaOnevisionVideoProcessor(),
        num_image_tokens=(tile // patch) ** 2,
        vision_feature_select_strategy="full",
        vision_aspect_ratio=f"anyres_max_{max_tiles}",
    )


def _config(cls_name: str, tile: int, patch: int, pinpoints: list[list[int]], dim: int):
    import transformers

    vision = dict(
        model_type="siglip_vision_model",
        image_size=tile,
        patch_size=patch,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
    )
    text = dict(
        model_type="qwen2",
        hidden_size=dim,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=64,
    )
    return getattr(transformers, cls_name)(
        vision_config=vision,
        text_config=text,
        image_grid_pinpoints=pinpoints,
        vision_feature_select_strategy="full",
    )


def pack_llava_next(features, image_sizes, newline, *, tile, patch, pinpoints):
    """``LlavaNextModel.pack_image_features`` on per-image crop features (a list of (crops, T, D)),
    concatenated: (sum of tokens, D), and the lengths. Only the method's config is built, no model."""
    from transformers.models.llava_next.modeling_llava_next import LlavaNextModel

    owner = SimpleNamespace(config=_config("LlavaNextConfig", tile, patch, pinpoints, newline.shape[0]))
    out, lengths = LlavaNextModel.pack_image_features(
        owner, features, torch.tensor(image_sizes), "full", image_newline=newline
    )
    return torch.cat(out), lengths


def pack_llava_onevision(features, image_sizes, newline, *, tile, patch, pinpoints, max_tiles):
    """``LlavaOnevisionModel.pack_image_features`` with ``anyres_max_{max_tiles}``, as
    :func:`pack_llava_next`."""
    from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModel

    owner = SimpleNamespace(config=_config("LlavaOnevisionConfig", tile, patch, pinpoints, newline.shape[0]))
    out, lengths = LlavaOnevisionModel.pack_image_features(
        owner,
        features,
        torch.tensor(image_sizes),
        image_newline=newline,
        vision_aspect_ratio=f"anyres_max_{max_tiles}",
    )
    return torch.cat(out), lengths
