"""Build towers from checkpoints of any supported layout, and save them in transformers' layout."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch

from .checkpoint import CheckpointError, read_checkpoint, strict_load, write_safetensors
from .config import SiglipConfig, TextConfig, VisionConfig
from .formats import transformers as hf
from .hub import resolve
from .presets import get_preset, list_presets
from .siglip import SiglipModel
from .vision import VisionTower

Tensor = torch.Tensor

_VISION_ANCHOR = "embeddings.patch_embedding.weight"  # transformers, every model that embeds a SigLIP tower
_TEXT_ANCHOR = "embeddings.token_embedding.weight"
# config.json model types whose ``vision_config`` describes a SigLIP tower
_VISION_CONFIG_HOSTS = {
    "siglip",
    "paligemma",
    "llava",
    "llava_next",
    "llava_onevision",
    "idefics3",
    "smolvlm",
}


def _prefix(keys: list[str], anchor: str, source: str) -> str:
    """The key prefix (``''``, ``'vision_model.'``, ``'model.vision_tower.'`` ...) in front of ``anchor``."""
    found = sorted({k[: -len(anchor)] for k in keys if k.endswith(anchor)})
    found = [p for p in found if p == "" or p.endswith(".")]
    if len(found) != 1:
        what = "no" if not found else f"{len(found)} ({found})"
        raise CheckpointError(
            f"{source}: found {what} SigLIP tower(s) ending in {anchor!r}; keys start with "
            f"{sorted({k.split('.')[0] for k in keys})[:20]}"
        )
    return found[0]


def _vision_config_dict(config: dict[str, Any] | None) -> dict[str, Any] | None:
    if config is None:
        return None
    if config.get("model_type") in ("siglip_vision_model", "siglip2_vision_model"):
        return config
    if config.get("model_type") in _VISION_CONFIG_HOSTS or "vision_config" in config:
        return config.get("vision_config") or {}
    return None


def _infer_vision_config(sd: dict[str, Tensor], source: str) -> VisionConfig:
    """Shapes give everything but the number of heads, which comes from a preset of the same shape."""
    patch = sd["patch_embed.weight"]  # (D, C, p, p)
    depth = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.blocks."))
    side = math.isqrt(sd["pos_embed"].shape[0])
    width, mlp = patch.shape[0], sd["encoder.blocks.0.mlp.fc1.weight"].shape[0]
    p = patch.shape[-1]
    same = [get_preset(n).vision for n in list_presets()]
    same = [
        v for v in same if (v.hidden_size, v.num_hidden_layers, v.intermediate_size) == (width, depth, mlp)
    ]
    if same:
        # 384 px in 14 px patches is a 27-token side: a preset with the same grid gives the pixel size
        sizes = [v.image_size for v in same if v.patch_size == p and v.image_size // p == side]
        return VisionConfig(
            hidden_size=width,
            intermediate_size=mlp,
            num_hidden_layers=depth,
            num_attention_heads=same[0].num_attention_heads,
            image_size=sizes[0] if sizes else side * p,
            patch_size=p,
            num_channels=patch.shape[1],
            use_head="head.probe" in sd,
        )
    raise CheckpointError(
        f"{source} has no config.json and its shapes (width {width}, depth {depth}, mlp {mlp}) "
        f"match no preset: put the transformers config.json beside the weights"
    )


def vision_tower_from_state_dict(
    sd: dict[str, Tensor],
    config: dict[str, Any] | None,
    *,
    source: str,
    image_size: int | None = None,
    use_head: bool | None = None,
) -> VisionTower:
    """A :class:`VisionTower` from a raw checkpoint state dict and its (optional) config.json."""
    prefix = _prefix(list(sd), _VISION_ANCHOR, source)
    native, leftover = hf.vision_to_native(
        {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    )
    leftover = [prefix + k for k in leftover]
    has_head = "head.probe" in native
    if use_head and not has_head:
        raise CheckpointError(f"use_head=True but {source} has no pooling head (keys {prefix}head.*)")
    keep_head = has_head if use_head is None else use_head
    if not keep_head:
        native = {k: v for k, v in native.items() if not k.startswith("head.")}
    cfg_dict = _vision_config_dict(config)
    if cfg_dict is None:
        vcfg = _infer_vision_config(native, source)
    else:
        vcfg = VisionConfig.from_hf({**cfg_dict, "vision_use_head": has_head})
    vcfg.use_head = keep_head
    with torch.device("meta"):
        tower = VisionTower(vcfg)
    tower = tower.to_empty(device="cpu")
    strict_load(tower, native, source=source, ignored=leftover)
    if image_size is not None and image_size != vcfg.image_size:
        tower.resize_pos_embed(image_size)
    return tower


# Parts of multimodal checkpoints that are not the image tower (never read when loading a tower).
_DECODER_PREFIXES = (
    "language_model.",
    "model.language_model.",
    "lm_head.",
    "multi_modal_projector.",
    "model.multi_modal_projector.",
    "text_model.",
)


def _not_a_decoder(key: str) -> bool:
    return not key.startswith(_DECODER_PREFIXES)


def load_vision_tower(
    src: str | os.PathLike,
    *,
    image_size: int | None = None,
    use_head: bool | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> VisionTower:
    sd, config = read_checkpoint(resolve(src, revision=revision, cache_dir=cache_dir), keep=_not_a_decoder)
    return vision_tower_from_state_dict(sd, config, source=str(src), image_size=image_size, use_head=use_head)


def load_siglip_model(
    src: str | os.PathLike, *, revision: str | None = None, cache_dir: str | os.PathLike | None = None
) -> SiglipModel:
    path = resolve(src, revision=revision, cache_dir=cache_dir)
    sd, config = read_checkpoint(Path(path))
    if config is None or config.get("model_type") != "siglip":
        found = None if config is None else config.get("model_type")
        raise CheckpointError(
            f"{src} is not a transformers SiglipModel checkpoint (config model_type {found!r}); "
            f"for the image tower alone use VisionTower.from_pretrained"
        )
    cfg = SiglipConfig(
        VisionConfig.from_hf(config.get("vision_config") or {}),
        TextConfig.from_hf(config.get("text_config") or {}),
    )
    native: dict[str, Tensor] = {}
    leftover: list[str] = []
    for tower, prefix, convert in (
        ("vision", "vision_model.", hf.vision_to_native),
        ("text", "text_model.", hf.text_to_native),
    ):
        part, rest = convert({k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)})
        native.update({f"{tower}.{k}": v for k, v in part.items()})
        leftover += [prefix + k for k in rest]
    for name in ("logit_scale", "logit_bias"):
        if name in sd:
            native[name] = sd[name].reshape(1)
    leftover += [k for k in sd if not k.startswith(("vision_model.", "text_model.", "logit_"))]
    cfg.vision.use_head = "vision.head.probe" in native
    with torch.device("meta"):
        model = SiglipModel(cfg)
    model = model.to_empty(device="cpu")
    strict_load(model, native, source=str(src), ignored=leftover)
    return model


def vision_state_dict_hf(tower: VisionTower) -> dict[str, Tensor]:
    """The tower's weights under transformers' names with the ``vision_model.`` infix."""
    return {f"vision_model.{k}": v for k, v in hf.vision_from_native(tower.state_dict()).items()}


def save_vision_tower(tower: VisionTower, out_dir: str | os.PathLike) -> Path:
    config = {"architectures": ["SiglipVisionModel"], **tower.config.to_hf()}
    return write_safetensors(vision_state_dict_hf(tower), out_dir, config)


def save_siglip_model(model: SiglipModel, out_dir: str | os.PathLike) -> Path:
    sd = vision_state_dict_hf(model.vision)
    sd.update({f"text_model.{k}": v for k, v in hf.text_from_native(model.text.state_dict()).items()})
    sd["logit_scale"] = model.logit_scale
    sd["logit_bias"] = model.logit_bias
    return write_safetensors(sd, out_dir, model.config.to_hf())
