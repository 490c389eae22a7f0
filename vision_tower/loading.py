"""Read checkpoints of any supported layout into this package's layout, and write transformers' layout.

Pure I/O and key conversion: this module never imports the model classes. It hands them
:class:`Weights` (a config plus a state dict in our layout), which they load strictly."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .checkpoint import CheckpointError, read_checkpoint, write_safetensors
from .config import SiglipConfig, TextConfig, VisionConfig
from .formats import transformers as hf
from .hub import resolve
from .presets import get_preset, list_presets

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


@dataclass
class Weights:
    """A checkpoint read into this package's layout, ready for a model of ``config`` to load strictly.

    ``ignored`` are source keys that mapped to nothing (reported as unexpected by the strict load).
    """

    config: Any  # VisionConfig or SiglipConfig
    state_dict: dict[str, Tensor]
    source: str
    ignored: list[str] = field(default_factory=list)


def vision_weights_from_state_dict(
    sd: dict[str, Tensor],
    config: dict[str, Any] | None,
    *,
    source: str,
    use_head: bool | None = None,
) -> Weights:
    """The image tower of a raw checkpoint state dict (any transformers layout) and its config.json."""
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
    return Weights(vcfg, native, source, leftover)


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


def read_vision_weights(
    src: str | os.PathLike,
    *,
    use_head: bool | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Weights:
    """The image tower of a folder, file or hub repo id; a multimodal checkpoint's decoder is never read."""
    sd, config = read_checkpoint(resolve(src, revision=revision, cache_dir=cache_dir), keep=_not_a_decoder)
    return vision_weights_from_state_dict(sd, config, source=str(src), use_head=use_head)


def read_siglip_weights(
    src: str | os.PathLike, *, revision: str | None = None, cache_dir: str | os.PathLike | None = None
) -> Weights:
    """Both towers, t' and b of a transformers ``SiglipModel`` folder, file or hub repo id."""
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
    return Weights(cfg, native, str(src), leftover)


def vision_state_dict_hf(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """An image tower's state dict (ours) under transformers' names with the ``vision_model.`` infix."""
    return {f"vision_model.{k}": v for k, v in hf.vision_from_native(sd).items()}


def write_vision_weights(config: VisionConfig, sd: dict[str, Tensor], out_dir: str | os.PathLike) -> Path:
    """transformers' ``SiglipVisionModel`` layout (config.json + model.safetensors) from our state dict."""
    hf_config = {"architectures": ["SiglipVisionModel"], **config.to_hf()}
    return write_safetensors(vision_state_dict_hf(sd), out_dir, hf_config)


def write_siglip_weights(config: SiglipConfig, sd: dict[str, Tensor], out_dir: str | os.PathLike) -> Path:
    """transformers' ``SiglipModel`` layout from our two-tower state dict (``vision.*``, ``text.*``, t', b)."""
    out = vision_state_dict_hf(_part(sd, "vision."))
    out.update({f"text_model.{k}": v for k, v in hf.text_from_native(_part(sd, "text.")).items()})
    out["logit_scale"] = sd["logit_scale"]
    out["logit_bias"] = sd["logit_bias"]
    return write_safetensors(out, out_dir, config.to_hf())


def _part(sd: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
