"""The transformers SigLIP layout (SigLIP, SigLIP 2, PaliGemma, LLaVA-style, Idefics3/SmolVLM and Gemma 3
VLMs) <-> this package's.

The key maps are pure state-dict functions:

transformers keeps separate q/k/v projections in every block and an ``nn.MultiheadAttention``
(with a packed ``in_proj``) in the pooling head; this package fuses q/k/v into one ``qkv``
projection and splits the head's projection into ``q`` and ``kv``. Everything else is a rename.
Keys there carry no tower prefix (``vision_model.`` / ``text_model.``). The registered :data:`FORMAT`
finds the image tower under any prefix (``''``, ``vision_model.``, PaliGemma's and Gemma 3's
``vision_tower.``, Idefics3's ``model.vision_model.`` ...), takes hyperparameters from ``config.json`` (a
SigLIP 2 NaFlex tower has a 2-d patch embedding; an Idefics3/SmolVLM tower's position lookup becomes a
plain table, :mod:`.idefics3`), and writes ``SiglipVisionModel`` / ``Siglip2VisionModel`` / ``SiglipModel``
folders.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import CheckpointError, write_safetensors
from ..config import NaFlexVisionConfig, SiglipConfig, TextConfig, VisionConfig
from ..presets import get_preset, list_presets
from . import idefics3
from .keys import OUR_BLOCK, depth_of, part, rename
from .registry import Files, Format, OutDir, Read, StateDict, register_format

Tensor = torch.Tensor

# (transformers module path, our module path); parameters keep their ``.weight`` / ``.bias`` suffix.
_BLOCK = [
    ("layer_norm1", "norm1"),
    ("layer_norm2", "norm2"),
    ("self_attn.out_proj", "attn.proj"),
    ("mlp.fc1", "mlp.fc1"),
    ("mlp.fc2", "mlp.fc2"),
]
_VISION = [
    ("embeddings.patch_embedding", "patch_embed"),
    ("embeddings.position_embedding.weight", "pos_embed"),
    ("post_layernorm", "norm"),
    ("head.probe", "head.probe"),
    ("head.attention.out_proj", "head.proj"),
    ("head.layernorm", "head.norm"),
    ("head.mlp.fc1", "head.mlp.fc1"),
    ("head.mlp.fc2", "head.mlp.fc2"),
]
_TEXT = [
    ("embeddings.token_embedding", "token_embed"),
    ("embeddings.position_embedding.weight", "pos_embed"),
    ("final_layer_norm", "norm"),
    ("head", "head"),
]
_HF_BLOCK = re.compile(r"^encoder\.layers\.(\d+)\.(.+)$")
_QKV = ("q_proj", "k_proj", "v_proj")


def _to_native(sd: dict[str, Tensor], table: list[tuple[str, str]]) -> tuple[dict[str, Tensor], list[str]]:
    """Rename/fuse; returns (native state dict, source keys that matched nothing)."""
    out: dict[str, Tensor] = {}
    leftover: list[str] = []
    qkv: dict[tuple[str, str], dict[str, Tensor]] = {}  # (layer, weight|bias) -> {q_proj: ...}
    in_proj: dict[str, Tensor] = {}
    for key, value in sd.items():
        m = _HF_BLOCK.match(key)
        if m:
            layer, rest = m.groups()
            proj, _, param = rest.removeprefix("self_attn.").partition(".")
            if rest.startswith("self_attn.") and proj in _QKV:
                qkv.setdefault((layer, param), {})[proj] = value
                continue
            new = rename(rest, _BLOCK)
            if new is None:
                leftover.append(key)
            else:
                out[f"encoder.blocks.{layer}.{new}"] = value
        elif key.startswith("head.attention.in_proj_"):
            in_proj[key.removeprefix("head.attention.in_proj_")] = value
        else:
            new = rename(key, table)
            if new is None:
                leftover.append(key)
            else:
                out[new] = value
    for (layer, param), parts in qkv.items():
        if len(parts) != 3:
            leftover.extend(f"encoder.layers.{layer}.self_attn.{p}.{param}" for p in parts)
            continue
        shapes = {p: tuple(parts[p].shape) for p in _QKV}
        if len(set(shapes.values())) > 1:
            raise CheckpointError(
                f"encoder.layers.{layer}.self_attn.{{q,k,v}}_proj.{param} differ in shape ({shapes}): they "
                "cannot be fused into one qkv projection"
            )
        out[f"encoder.blocks.{layer}.attn.qkv.{param}"] = torch.cat([parts[p] for p in _QKV], dim=0)
    for param, value in in_proj.items():  # rows ordered q, k, v
        dim = value.shape[0] // 3
        out[f"head.q.{param}"] = value[:dim]
        out[f"head.kv.{param}"] = value[dim:]
    return out, leftover


def _from_native(sd: dict[str, Tensor], table: list[tuple[str, str]]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    head_q: dict[str, Tensor] = {}
    for key, value in sd.items():
        m = OUR_BLOCK.match(key)
        if m:
            layer, rest = m.groups()
            if rest.startswith("attn.qkv."):
                param = rest.removeprefix("attn.qkv.")
                for proj, part in zip(_QKV, value.chunk(3, dim=0)):
                    out[f"encoder.layers.{layer}.self_attn.{proj}.{param}"] = part.contiguous()
                continue
            new = rename(rest, _BLOCK, reverse=True)
            key_out = None if new is None else f"encoder.layers.{layer}.{new}"
        elif key.startswith("head.q."):
            head_q[key.removeprefix("head.q.")] = value
            continue
        elif key.startswith("head.kv."):
            continue  # written with head.q below
        else:
            key_out = rename(key, table, reverse=True)
        if key_out is None:
            raise KeyError(f"no transformers name for parameter {key!r}")
        out[key_out] = value.contiguous()
    for param, q in head_q.items():
        out[f"head.attention.in_proj_{param}"] = torch.cat([q, sd[f"head.kv.{param}"]], dim=0)
    return out


def vision_to_native(sd: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """transformers ``SiglipVisionTransformer`` keys (no prefix) -> ours, plus unmatched keys."""
    return _to_native(sd, _VISION)


def vision_from_native(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    return _from_native(sd, _VISION)


def text_to_native(sd: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    return _to_native(sd, _TEXT)


def text_from_native(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    return _from_native(sd, _TEXT)


# ----------------------------------------------------------------------------- reading
VISION_ANCHOR = "embeddings.patch_embedding.weight"

# config.json model types whose ``vision_config`` describes a SigLIP tower
_VISION_CONFIG_HOSTS = {
    "siglip",
    "siglip2",
    "paligemma",
    "llava",
    "llava_next",
    "llava_onevision",
    "gemma3",
    *idefics3.HOSTS,
}
_NAFLEX_MODEL_TYPE = "siglip2_vision_model"
_VISION_MODEL_TYPES = ("siglip_vision_model", _NAFLEX_MODEL_TYPE, *idefics3.VISION_MODEL_TYPES)


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
    if config.get("model_type") in _VISION_MODEL_TYPES:
        return config
    if config.get("model_type") in _VISION_CONFIG_HOSTS or "vision_config" in config:
        return config.get("vision_config") or {}
    return None


def _infer_vision_config(sd: dict[str, Tensor], source: str) -> VisionConfig:
    """Shapes give everything but the number of heads, which comes from a preset of the same shape."""
    patch = sd["patch_embed.weight"]  # (D, C, p, p)
    depth = depth_of(sd)
    side = math.isqrt(sd["pos_embed"].shape[0])
    width, mlp = patch.shape[0], sd["encoder.blocks.0.mlp.fc1.weight"].shape[0]
    p = patch.shape[-1]
    same = [get_preset(n).vision for n in list_presets()]
    same = [
        v for v in same if (v.hidden_size, v.num_hidden_layers, v.intermediate_size) == (width, depth, mlp)
    ]
    if same and patch.dim() == 4:
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


def read_vision(files: Files, source: str) -> Read:
    sd = files.state_dict
    prefix = _prefix(list(sd), VISION_ANCHOR, source)
    native, leftover = vision_to_native(part(sd, prefix))
    leftover = [prefix + k for k in leftover]
    cfg_dict = _vision_config_dict(files.config)
    if idefics3.holds(files.config):
        cfg_dict = idefics3.vision_config(cfg_dict or {})
        if "pos_embed" in native:  # else the strict load names it missing
            native["pos_embed"] = idefics3.full_grid_table(native["pos_embed"], source)
    naflex = (
        native["patch_embed.weight"].dim() == 2 or (cfg_dict or {}).get("model_type") == _NAFLEX_MODEL_TYPE
    )
    if cfg_dict is None:
        return native, _infer_vision_config(native, source), leftover
    cfg_dict = {**cfg_dict, "vision_use_head": "head.probe" in native}
    try:
        config = (NaFlexVisionConfig if naflex else VisionConfig).from_hf(cfg_dict)
    except ValueError as err:  # a field of the wrong type or value: name the file it came from
        raise CheckpointError(f"{source} (config.json): {err}") from None
    return native, config, leftover


def read_siglip(files: Files, source: str) -> Read:
    sd, config = files.state_dict, files.config
    if config is None or config.get("model_type") != "siglip":
        found = None if config is None else config.get("model_type")
        raise CheckpointError(
            f"{source} is not a transformers SiglipModel checkpoint (config model_type {found!r}); "
            f"for the image tower alone use VisionTower.from_pretrained"
            + ("; a SigLIP 2 NaFlex image tower loads with NaFlexVisionTower" if found == "siglip2" else "")
        )
    cfg = SiglipConfig(
        VisionConfig.from_hf(config.get("vision_config") or {}),
        TextConfig.from_hf(config.get("text_config") or {}),
    )
    native: dict[str, Tensor] = {}
    leftover: list[str] = []
    for tower, prefix, convert in (
        ("vision", "vision_model.", vision_to_native),
        ("text", "text_model.", text_to_native),
    ):
        converted, rest = convert(part(sd, prefix))
        native.update({f"{tower}.{k}": v for k, v in converted.items()})
        leftover += [prefix + k for k in rest]
    for name in ("logit_scale", "logit_bias"):
        if name in sd:
            native[name] = sd[name].reshape(1)
    leftover += [k for k in sd if not k.startswith(("vision_model.", "text_model.", "logit_"))]
    return native, cfg, leftover


# ----------------------------------------------------------------------------- writing
def vision_state_dict_hf(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """An image tower's state dict (ours) under transformers' names with the ``vision_model.`` infix."""
    return {f"vision_model.{k}": v for k, v in vision_from_native(sd).items()}


def write_vision(config: VisionConfig | NaFlexVisionConfig, sd: StateDict, out_dir: OutDir) -> Path:
    """transformers' ``SiglipVisionModel`` (``Siglip2VisionModel`` for NaFlex) layout."""
    arch = "Siglip2VisionModel" if isinstance(config, NaFlexVisionConfig) else "SiglipVisionModel"
    return write_safetensors(vision_state_dict_hf(sd), out_dir, {"architectures": [arch], **config.to_hf()})


def write_siglip(
    config: SiglipConfig, sd: StateDict, out_dir: OutDir, *, allow_gelu_change: bool = False
) -> Path:
    """transformers' ``SiglipModel`` layout (``allow_gelu_change`` does not apply: any GELU is written)."""
    tensors = vision_state_dict_hf(part(sd, "vision."))
    tensors.update({f"text_model.{k}": v for k, v in text_from_native(part(sd, "text.")).items()})
    tensors["logit_scale"] = sd["logit_scale"]
    tensors["logit_bias"] = sd["logit_bias"]
    return write_safetensors(tensors, out_dir, config.to_hf())


FORMAT = register_format(
    Format(
        "transformers",
        where="google/siglip-*, google/siglip2-*, PaliGemma, LLaVA-style, Idefics3/SmolVLM and Gemma 3 VLMs "
        "(safetensors + config.json)",
        looks_for=f"a key ending in {VISION_ANCHOR!r}",
        detect=lambda keys: any(k.endswith(VISION_ANCHOR) for k in keys),
        read_vision=read_vision,
        read_siglip=read_siglip,
        write_vision=write_vision,
        write_siglip=write_siglip,
        # the parts of VLM checkpoints that are not the image tower
        non_vision_prefixes=(
            "language_model.",
            "model.language_model.",
            "lm_head.",
            "multi_modal_projector.",
            "model.multi_modal_projector.",
            "text_model.",
            "model.text_model.",  # Idefics3/SmolVLM
            "model.connector.",
        ),
    )
)
