"""What the command line (and any script) does with a model source string: a local folder or file, a
hub repo id, or ``preset:NAME`` for random weights of a registered shape.

The command modules only parse arguments and print; the decisions live here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .checkpoint import read_checkpoint, read_json
from .hub import resolve
from .processor import ImageProcessor
from .siglip import SiglipModel
from .vision import VisionTower

PRESET_PREFIX = "preset:"
INFO_SIZES = (224, 256, 384, 448, 512)


def preset_name(src: str) -> str | None:
    """``NAME`` of a ``preset:NAME`` source, else None."""
    return src[len(PRESET_PREFIX) :] if str(src).startswith(PRESET_PREFIX) else None


def model_type(src: str | os.PathLike) -> str | None:
    """The ``model_type`` of a checkpoint's config.json (``"siglip"`` for presets), or None without one."""
    if preset_name(str(src)) is not None:
        return "siglip"
    path = resolve(src)
    config = (path if path.is_dir() else path.parent) / "config.json"
    data = read_json(config) if config.exists() else {}
    return data.get("model_type") if isinstance(data, dict) else None


def is_siglip_model(src: str | os.PathLike) -> bool:
    """Does ``src`` hold both towers (a transformers ``SiglipModel`` checkpoint or a preset)?"""
    return model_type(src) == "siglip"


def load_tower(
    src: str | os.PathLike,
    *,
    image_size: int | None = None,
    feature_layer: int = -1,
    use_head: bool | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> VisionTower:
    """``preset:NAME`` (random weights) or anything :meth:`VisionTower.from_pretrained` reads."""
    name = preset_name(str(src))
    if name is None:
        return VisionTower.from_pretrained(
            src,
            image_size=image_size,
            feature_layer=feature_layer,
            use_head=use_head,
            dtype=dtype,
            device=device,
        )
    overrides = {} if use_head is None else {"use_head": use_head}
    tower = VisionTower.from_preset(name, feature_layer=feature_layer, **overrides)
    if image_size:
        tower.resize_pos_embed(image_size)
    return tower.to(device=device, dtype=dtype)


def processor_for(src: str | os.PathLike, image_size: int) -> ImageProcessor:
    """The checkpoint's own preprocessing (mean/std/filter) at ``image_size`` if it ships one, else SigLIP's."""
    if preset_name(str(src)) is None:
        path = resolve(src)
        folder = path if path.is_dir() else path.parent
        if (folder / "preprocessor_config.json").exists():
            return ImageProcessor.from_pretrained(folder).with_image_size(image_size)
    return ImageProcessor(image_size=image_size)


def _count(module: torch.nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def describe(src: str) -> dict[str, Any]:
    """Configs, parameter counts and the token grid per resolution of a checkpoint or preset.

    A preset is built on the meta device (shapes only, no weights)."""
    full = is_siglip_model(src)
    name = preset_name(src)
    if name is not None:
        with torch.device("meta"):
            model = SiglipModel.from_preset(name)
        tower, text = model.vision, model.text
    elif full:
        model = SiglipModel.from_pretrained(src)
        tower, text = model.vision, model.text
    else:
        tower, text = load_tower(src), None
    cfg = tower.config
    return {
        "source": src,
        "kind": "SiglipModel" if full else "SiglipVisionModel",
        "vision": cfg.to_dict(),
        "vision_params": _count(tower),
        "head_params": _count(tower.head),
        "text": None if text is None else text.config.to_dict(),
        "text_params": None if text is None else _count(text),
        "patch_size": cfg.patch_size,
        "grids": {size: size // cfg.patch_size for size in sorted({*INFO_SIZES, cfg.image_size})},
        "native_size": cfg.image_size,
    }


@dataclass
class Converted:
    kind: str  # "SiglipModel" or "SiglipVisionModel"
    image_size: int
    num_tensors: int


def convert(
    src: str,
    out: str | os.PathLike,
    *,
    image_size: int | None = None,
    use_head: bool | None = None,
    vision_only: bool = False,
) -> Converted:
    """Write ``src`` in transformers' layout (plus its preprocessing) into ``out``."""
    if is_siglip_model(src) and not vision_only:
        if image_size or use_head is False:
            raise ValueError("--image-size/--no-head apply to the image tower alone: add --vision-only")
        model = (
            SiglipModel.from_pretrained(src)
            if preset_name(src) is None
            else SiglipModel.from_preset(preset_name(src))
        )
        model.save_pretrained(out)
        kind, size = "SiglipModel", model.vision.config.image_size
    else:
        tower = load_tower(src, image_size=image_size, use_head=use_head)
        tower.save_pretrained(out)
        kind, size = "SiglipVisionModel", tower.config.image_size
    processor_for(src, size).save_pretrained(out)
    sd, _ = read_checkpoint(Path(out))
    return Converted(kind, size, len(sd))
