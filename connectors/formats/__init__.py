"""Checkpoint formats of the VLM: ``native`` (everything), ``paligemma`` and ``llava`` (transformers loads them)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from vision_tower.checkpoint import read_json
from vision_tower.hub import resolve

from . import llava, native, paligemma
from .common import FormatError

if TYPE_CHECKING:
    from ..vlm import VisionLanguageModel

FORMATS = {"native": native, "paligemma": paligemma, "llava": llava}
_BY_MODEL_TYPE = {native.MODEL_TYPE: native, "paligemma": paligemma, "llava": llava}


def save(
    vlm: VisionLanguageModel,
    out_dir: str | os.PathLike,
    *,
    format: str,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> None:
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; known formats: {', '.join(FORMATS)}")
    FORMATS[format].save(vlm, Path(out_dir), state_dict)


def checkpoint_format(config: dict, source: str) -> str:
    """The format of a checkpoint from its config.json ``model_type``."""
    kind = config.get("model_type")
    for name, module in FORMATS.items():
        if _BY_MODEL_TYPE.get(kind) is module:
            return name
    raise ValueError(
        f"{source} is not a VLM checkpoint: config.json model_type {kind!r}; readable: "
        f"{', '.join(sorted(_BY_MODEL_TYPE))}"
    )


def load(
    src: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> VisionLanguageModel:
    path = resolve(src, revision=revision, cache_dir=cache_dir)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{src}: no config.json")
    config = read_json(path / "config.json")
    fmt = checkpoint_format(config, str(src))
    return FORMATS[fmt].load(path, config, dtype=dtype, device=device)


__all__ = ["FORMATS", "FormatError", "checkpoint_format", "load", "save"]
