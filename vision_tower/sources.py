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
from .config import NaFlexVisionConfig
from .formats import big_vision, open_clip
from .hub import resolve
from .loading import read_vision_weights
from .naflex import NaFlexVisionTower
from .naflex_processor import NAFLEX_TYPES, NaFlexImageProcessor
from .presets import preset_name
from .processor import CONFIG_NAME as PROCESSOR_CONFIG
from .processor import ImageProcessor
from .saving import DEFAULT_FORMAT, check_format
from .siglip import SiglipModel
from .vision import VisionTower

INFO_SIZES = (224, 256, 384, 448, 512)
# config.json model types of a tower alone (or both towers), not of a model it was read out of
_TOWER_MODEL_TYPES = (
    None,
    "siglip",
    "siglip2",
    "siglip_vision_model",
    "siglip2_vision_model",
    "idefics3_vision",
    "smolvlm_vision",
)
AnyTower = VisionTower | NaFlexVisionTower
AnyProcessor = ImageProcessor | NaFlexImageProcessor


def _folder(src: str | os.PathLike) -> Path:
    path = resolve(src)
    return path if path.is_dir() else path.parent


def _json(file: Path) -> Any:
    """The parsed JSON file (an error naming file and line if it is invalid), or None if it is missing."""
    return read_json(file) if file.exists() else None


def model_type(src: str | os.PathLike) -> str | None:
    """The ``model_type`` of a checkpoint's config.json (``"siglip"`` for presets), or None without one."""
    if preset_name(src) is not None:
        return "siglip"
    data = _json(_folder(src) / "config.json") or {}
    return data.get("model_type") if isinstance(data, dict) else None


def is_siglip_model(src: str | os.PathLike) -> bool:
    """Does ``src`` hold both towers (transformers ``SiglipModel``, open_clip, two-tower big_vision,
    preset)?"""
    if preset_name(src) is not None:
        return True
    path = resolve(src)
    if (_folder(src) / open_clip.CONFIG_NAME).exists():
        return True
    npz = big_vision.npz_file(path)
    if npz is not None:
        import numpy as np

        with np.load(npz, allow_pickle=False) as f:
            return big_vision.TEXT_ROOT + "head/kernel" in f.files
    return model_type(src) == "siglip"


def load_tower(
    src: str | os.PathLike,
    *,
    image_size: int | None = None,
    feature_layer: int = -1,
    use_head: bool | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> AnyTower:
    """``preset:NAME`` (random weights) or any image tower a checkpoint holds: a :class:`VisionTower`, or a
    :class:`NaFlexVisionTower` for SigLIP 2 NaFlex checkpoints (which take no ``image_size``)."""
    name = preset_name(src)
    if name is None:
        weights = read_vision_weights(src, use_head=use_head)
        if isinstance(weights.config, NaFlexVisionConfig):
            if image_size is not None:
                raise ValueError(
                    f"{src} is a NaFlex tower: images keep their aspect ratio and the processor's "
                    f"max_num_patches sets their size; image_size={image_size} does not apply"
                )
            tower: AnyTower = NaFlexVisionTower.from_weights(
                weights, feature_layer=feature_layer, dtype=dtype
            )
        else:
            tower = VisionTower.from_weights(
                weights, image_size=image_size, feature_layer=feature_layer, dtype=dtype
            )
        return tower.to(device=device)
    overrides = {} if use_head is None else {"use_head": use_head}
    tower = VisionTower.from_preset(name, feature_layer=feature_layer, **overrides)
    if image_size:
        tower.resize_pos_embed(image_size)
    return tower.to(device=device, dtype=dtype)


def processor_for(
    src: str | os.PathLike, image_size: int | None = None, *, max_num_patches: int | None = None
) -> AnyProcessor:
    """The checkpoint's own preprocessing (at ``image_size``; NaFlex: with ``max_num_patches``) from its
    ``preprocessor_config.json``, timm or open_clip config, else SigLIP's."""
    if preset_name(src) is not None:
        return ImageProcessor(image_size=image_size or 224)
    folder = _folder(src)
    config = _json(folder / PROCESSOR_CONFIG)
    if config is not None and (
        config.get("image_processor_type") in NAFLEX_TYPES or "max_num_patches" in config
    ):
        overrides = {} if max_num_patches is None else {"max_num_patches": max_num_patches}
        return NaFlexImageProcessor.from_dict(config, **overrides)
    if config is not None:
        processor = ImageProcessor.from_dict(config)
        return processor.with_image_size(image_size) if image_size else processor
    stats = (_json(folder / "config.json") or {}).get("pretrained_cfg") or (
        _json(folder / open_clip.CONFIG_NAME) or {}
    ).get("preprocess_cfg", {})  # timm, open_clip
    kwargs = {k: stats[k] for k in ("mean", "std") if k in stats}
    return ImageProcessor(image_size=image_size or 224, **kwargs)


def processor_for_tower(
    src: str | os.PathLike, tower: AnyTower, *, max_num_patches: int | None = None
) -> AnyProcessor:
    """:func:`processor_for` a loaded tower: at its image size, or for a NaFlex tower the checkpoint's
    Siglip2 preprocessing (else SigLIP 2's: bilinear, mean = std = 0.5) with its patch size."""
    if not isinstance(tower, NaFlexVisionTower):
        if max_num_patches is not None:
            raise ValueError(f"max_num_patches applies to NaFlex towers; {src} has a fixed resolution")
        return processor_for(src, tower.config.image_size)
    processor = processor_for(src, max_num_patches=max_num_patches)
    if not isinstance(processor, NaFlexImageProcessor):  # no Siglip2 preprocessor_config.json beside it
        budget = max_num_patches or tower.config.num_patches
        processor = NaFlexImageProcessor(patch_size=tower.config.patch_size, max_num_patches=budget)
    if processor.patch_size != tower.config.patch_size:
        raise ValueError(
            f"{src}: preprocessor patch_size {processor.patch_size} differs from the tower's "
            f"{tower.config.patch_size}"
        )
    return processor


def _count(module: torch.nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def describe(src: str) -> dict[str, Any]:
    """Configs, parameter counts and the token grid per resolution of a checkpoint or preset; ``read_from``
    is the ``model_type`` of the model a tower was read out of (``"smolvlm"``, ``"gemma3"``...), else None.

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
    naflex = isinstance(tower, NaFlexVisionTower)
    host = None if name is not None else model_type(src)
    return {
        "source": src,
        "kind": "SiglipModel" if full else ("Siglip2VisionModel (NaFlex)" if naflex else "SiglipVisionModel"),
        "read_from": None if host in _TOWER_MODEL_TYPES else host,
        "vision": cfg.to_dict(),
        "vision_params": _count(tower),
        "head_params": _count(tower.head),
        "text": None if text is None else text.config.to_dict(),
        "text_params": None if text is None else _count(text),
        "patch_size": cfg.patch_size,
        "grids": {}
        if naflex
        else {size: size // cfg.patch_size for size in sorted({*INFO_SIZES, cfg.image_size})},
        "native_size": None if naflex else cfg.image_size,
        "max_num_patches": cfg.num_patches if naflex else None,
    }


@dataclass
class Converted:
    kind: str  # "SiglipModel", "SiglipVisionModel" or "Siglip2VisionModel (NaFlex)"
    image_size: int | None  # None for NaFlex towers
    num_tensors: int
    format: str = DEFAULT_FORMAT


def _load_model(src: str) -> SiglipModel:
    name = preset_name(src)
    return SiglipModel.from_preset(name) if name is not None else SiglipModel.from_pretrained(src)


def convert(
    src: str,
    out: str | os.PathLike,
    *,
    image_size: int | None = None,
    use_head: bool | None = None,
    vision_only: bool = False,
    to: str = DEFAULT_FORMAT,
    allow_gelu_change: bool = False,
) -> Converted:
    """Write ``src`` in layout ``to`` (``transformers``, ``timm``, ``open_clip``) into ``out``, with its
    preprocessing (``preprocessor_config.json`` for ``transformers``; timm and open_clip keep theirs in their
    config files).

    timm holds image towers only, so ``to="timm"`` writes the image tower of a two-tower source."""
    check_format(to)
    if to == "open_clip" and vision_only:
        raise ValueError("open_clip checkpoints hold both towers: --to open_clip cannot be --vision-only")
    if is_siglip_model(src) and not vision_only and to != "timm":
        if image_size or use_head is False:
            raise ValueError("--image-size/--no-head apply to the image tower alone: add --vision-only")
        model = _load_model(src)
        model.save_pretrained(out, format=to, allow_gelu_change=allow_gelu_change)
        kind, tower = "SiglipModel", model.vision
    else:
        if to == "open_clip":
            raise ValueError(f"{src} holds an image tower only; open_clip checkpoints hold both towers")
        tower = load_tower(src, image_size=image_size, use_head=use_head)
        tower.save_pretrained(out, format=to)
        kind = "Siglip2VisionModel (NaFlex)" if isinstance(tower, NaFlexVisionTower) else "SiglipVisionModel"
    naflex = isinstance(tower, NaFlexVisionTower)
    size = None if naflex else tower.config.image_size
    if to == "transformers":
        processor_for_tower(src, tower).save_pretrained(out)
    weights = Path(out) / (open_clip.WEIGHTS_NAME if to == "open_clip" else "model.safetensors")
    sd, _ = read_checkpoint(weights)
    return Converted(kind, size, len(sd), to)
