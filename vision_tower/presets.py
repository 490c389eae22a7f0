"""Named model shapes, registered like timm's models. Each preset is a few numbers."""

from __future__ import annotations

import os
from collections.abc import Callable

from .config import SiglipConfig, TextConfig, VisionConfig

_PRESETS: dict[str, Callable[[], SiglipConfig]] = {}
PRESET_PREFIX = "preset:"  # a model source ``preset:NAME`` is random weights of preset NAME


def register_preset(fn: Callable[[], SiglipConfig]) -> Callable[[], SiglipConfig]:
    """Register ``fn`` (returning a :class:`SiglipConfig`) under its function name."""
    if fn.__name__ in _PRESETS:
        raise ValueError(f"preset {fn.__name__!r} is registered twice")
    _PRESETS[fn.__name__] = fn
    return fn


def list_presets() -> list[str]:
    return sorted(_PRESETS)


def get_preset(name: str) -> SiglipConfig:
    """A fresh config for preset ``name``; an unknown name lists the known ones."""
    if name not in _PRESETS:
        raise KeyError(f"unknown preset {name!r}; known presets: {', '.join(list_presets())}")
    return _PRESETS[name]()


def preset_name(src: str | os.PathLike | None) -> str | None:
    """``NAME`` of a ``preset:NAME`` model source, else None."""
    text = "" if src is None else str(src)
    return text[len(PRESET_PREFIX) :] if text.startswith(PRESET_PREFIX) else None


def _vit(width: int, depth: int, heads: int, mlp: int, image: int, patch: int) -> VisionConfig:
    return VisionConfig(
        hidden_size=width,
        num_hidden_layers=depth,
        num_attention_heads=heads,
        intermediate_size=mlp,
        image_size=image,
        patch_size=patch,
    )


def _txt(width: int, depth: int, heads: int, mlp: int, vocab: int = 32000, **kw) -> TextConfig:
    return TextConfig(
        hidden_size=width,
        num_hidden_layers=depth,
        num_attention_heads=heads,
        intermediate_size=mlp,
        vocab_size=vocab,
        **kw,
    )


def _base(image: int) -> SiglipConfig:  # google/siglip-base-patch16-*
    return SiglipConfig(_vit(768, 12, 12, 3072, image, 16), _txt(768, 12, 12, 3072))


def _large(image: int) -> SiglipConfig:  # google/siglip-large-patch16-*
    return SiglipConfig(_vit(1024, 24, 16, 4096, image, 16), _txt(1024, 24, 16, 4096))


def _so400m(image: int, patch: int, vocab: int) -> SiglipConfig:  # shape-optimised 400M (SigLIP, SigLIP 2)
    return SiglipConfig(_vit(1152, 27, 16, 4304, image, patch), _txt(1152, 27, 16, 4304, vocab))


@register_preset
def tiny() -> SiglipConfig:
    """For tests and the demo: 32 px images in 8 px patches (4x4 tokens), two blocks of width 64."""
    return SiglipConfig(
        _vit(64, 2, 4, 128, 32, 8),
        _txt(
            64,
            2,
            4,
            128,
            vocab=1024,
            max_position_embeddings=16,
            pad_token_id=1,
            bos_token_id=None,
            eos_token_id=1,
        ),
    )


@register_preset
def b16_224() -> SiglipConfig:
    return _base(224)


@register_preset
def b16_256() -> SiglipConfig:
    return _base(256)


@register_preset
def b16_384() -> SiglipConfig:
    return _base(384)


@register_preset
def b16_512() -> SiglipConfig:
    return _base(512)


@register_preset
def l16_256() -> SiglipConfig:
    return _large(256)


@register_preset
def l16_384() -> SiglipConfig:
    return _large(384)


@register_preset
def so400m_p14_224() -> SiglipConfig:
    return _so400m(224, 14, 32000)


@register_preset
def so400m_p14_384() -> SiglipConfig:
    return _so400m(384, 14, 32000)


@register_preset
def so400m_p16_256() -> SiglipConfig:  # SigLIP 2 (Gemma tokenizer)
    return _so400m(256, 16, 256000)


@register_preset
def so400m_p16_384() -> SiglipConfig:  # SigLIP 2 (Gemma tokenizer)
    return _so400m(384, 16, 256000)
