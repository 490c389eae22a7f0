"""Write our state dicts in a layout another framework loads unchanged, through the format registry
(:mod:`.formats`): ``transformers`` (the default), ``timm``, ``open_clip``."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .config import NaFlexVisionConfig, SiglipConfig, VisionConfig
from .formats import get_format, list_formats

Tensor = torch.Tensor

DEFAULT_FORMAT = "transformers"


def writable_formats() -> tuple[str, ...]:
    """The names of the layouts checkpoints can be written in."""
    return list_formats(writable=True)


def check_format(format: str) -> str:
    """``format`` if checkpoints can be written in it; otherwise an error naming those that can."""
    return get_format(format, writable=True).name


def write_vision_weights(
    config: VisionConfig | NaFlexVisionConfig,
    sd: dict[str, Tensor],
    out_dir: str | os.PathLike,
    format: str = DEFAULT_FORMAT,
) -> Path:
    """An image tower in ``format``: ``transformers`` is transformers' ``SiglipVisionModel``
    (``Siglip2VisionModel`` for NaFlex) layout, ``timm`` is timm's ``model.safetensors`` + ``config.json``."""
    fmt = get_format(format, writable=True)
    if fmt.write_vision is None:
        raise ValueError(f"{fmt.name} checkpoints do not hold an image tower alone: save a SiglipModel")
    return fmt.write_vision(config, sd, out_dir)


def write_siglip_weights(
    config: SiglipConfig,
    sd: dict[str, Tensor],
    out_dir: str | os.PathLike,
    format: str = DEFAULT_FORMAT,
    *,
    allow_gelu_change: bool = False,
) -> Path:
    """Both towers, t' and b in ``format``: ``transformers`` is transformers' ``SiglipModel`` layout,
    ``open_clip`` is ``open_clip_model.safetensors`` + ``open_clip_config.json`` (``allow_gelu_change``:
    see :func:`.formats.open_clip.open_clip_config`)."""
    fmt = get_format(format, writable=True)
    if fmt.write_siglip is None:
        raise ValueError(f"{fmt.name} checkpoints hold the image tower only: save model.vision")
    return fmt.write_siglip(config, sd, out_dir, allow_gelu_change=allow_gelu_change)
