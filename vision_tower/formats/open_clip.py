"""open_clip SigLIP layout (``open_clip_model.safetensors`` + ``open_clip_config.json``) <-> ours.

An open_clip SigLIP is a ``CustomTextCLIP``: the image tower is a timm ``VisionTransformer`` under
``visual.trunk.`` (see :mod:`.timm`), the text tower open_clip's ``TextTransformer`` under ``text.``
(``nn.MultiheadAttention`` with a packed ``in_proj``, which is our fused ``qkv``), and 0-d
``logit_scale`` / ``logit_bias``. ``model_cfg`` of the config file gives what the weights do not:
the timm architecture (heads and GELU of the image tower), the text heads and GELU. The registered
:data:`FORMAT` reads both towers (or the image tower alone) and writes both towers.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import CheckpointError, save_safetensors
from ..config import SiglipConfig, TextConfig, VisionConfig
from . import timm
from .keys import OUR_BLOCK, part, rename, text_shape
from .registry import Files, Format, OutDir, Read, StateDict, register_format, with_source

Tensor = torch.Tensor

_OTHER_GELU = {"gelu": "gelu_pytorch_tanh", "gelu_pytorch_tanh": "gelu"}
VISION_PREFIX = "visual.trunk."
TEXT_PREFIX = "text."
CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"

_TEXT = [
    ("token_embedding", "token_embed"),
    ("positional_embedding", "pos_embed"),
    ("ln_final", "norm"),
    ("text_projection", "head"),
]
_TEXT_BLOCK = [
    ("ln_1", "norm1"),
    ("attn.in_proj_weight", "attn.qkv.weight"),
    ("attn.in_proj_bias", "attn.qkv.bias"),
    ("attn.out_proj", "attn.proj"),
    ("ln_2", "norm2"),
    ("mlp.c_fc", "mlp.fc1"),
    ("mlp.c_proj", "mlp.fc2"),
]
_THEIR_BLOCK = re.compile(r"^transformer\.resblocks\.(\d+)\.(.+)$")


def text_to_native(sd: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """open_clip ``TextTransformer`` keys (no ``text.`` prefix) -> ours, plus keys that matched nothing."""
    out: dict[str, Tensor] = {}
    leftover: list[str] = []
    for key, value in sd.items():
        m = _THEIR_BLOCK.match(key)
        if m:
            new = rename(m.group(2), _TEXT_BLOCK, reverse=False)
            new = None if new is None else f"encoder.blocks.{m.group(1)}.{new}"
        elif key == "text_projection":  # a bare (width, embed_dim) matrix when proj_bias is off
            out["head.weight"] = value.t()
            out["head.bias"] = value.new_zeros(value.shape[1])
            continue
        else:
            new = rename(key, _TEXT, reverse=False)
        if new is None:
            leftover.append(key)
        else:
            out[new] = value
    return out, leftover


def text_from_native(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        m = OUR_BLOCK.match(key)
        if m:
            new = rename(m.group(2), _TEXT_BLOCK, reverse=True)
            new = None if new is None else f"transformer.resblocks.{m.group(1)}.{new}"
        else:
            new = rename(key, _TEXT, reverse=True)
        if new is None:
            raise KeyError(f"no open_clip name for text parameter {key!r}")
        out[new] = value
    return out


def to_native(sd: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """A whole open_clip SigLIP state dict -> our ``SiglipModel`` keys, plus keys that matched nothing."""
    vision, left_v = timm.vision_to_native(part(sd, VISION_PREFIX))
    text, left_t = text_to_native(part(sd, TEXT_PREFIX))
    out = {f"vision.{k}": v for k, v in vision.items()}
    out.update({f"text.{k}": v for k, v in text.items()})
    for name in ("logit_scale", "logit_bias"):
        if name in sd:
            out[name] = sd[name].reshape(1)  # 0-d in open_clip, (1,) here
    leftover = [VISION_PREFIX + k for k in left_v] + [TEXT_PREFIX + k for k in left_t]
    leftover += [k for k in sd if not k.startswith((VISION_PREFIX, TEXT_PREFIX, "logit_"))]
    return out, leftover


def from_native(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our ``SiglipModel`` state dict -> open_clip's keys."""
    out = {VISION_PREFIX + k: v for k, v in timm.vision_from_native(part(sd, "vision.")).items()}
    out.update({TEXT_PREFIX + k: v for k, v in text_from_native(part(sd, "text.")).items()})
    out["logit_scale"] = sd["logit_scale"].reshape(())
    out["logit_bias"] = sd["logit_bias"].reshape(())
    return out


# ----------------------------------------------------------------------------- open_clip_config.json
def vision_config(model_cfg: dict[str, Any], sd: dict[str, Tensor], source: str) -> VisionConfig:
    """The image tower's config from ``model_cfg`` and its weights (in our layout, no ``vision.`` prefix)."""
    cfg = model_cfg.get("vision_cfg") or {}
    name = cfg.get("timm_model_name")
    if not name:
        raise ValueError(
            f"{source}: vision_cfg has no timm_model_name; only timm-trunk SigLIP towers are read"
        )
    if cfg.get("timm_proj", "linear") not in ("none", "", None):
        raise ValueError(
            f"{source}: timm_proj={cfg['timm_proj']!r} adds a projection SigLIP towers do not have"
        )
    size = cfg.get("image_size", timm.get_timm_arch(name).image_size)
    return timm.vision_config({"architecture": name, "model_args": {"img_size": size}}, sd, source)


def text_config(model_cfg: dict[str, Any], sd: dict[str, Tensor], source: str) -> TextConfig:
    """The text tower's config from ``model_cfg`` and its weights (in our layout, no ``text.`` prefix)."""
    cfg = model_cfg.get("text_cfg") or {}
    if cfg.get("hf_model_name"):
        raise ValueError(
            f"{source}: a Hugging Face text tower ({cfg['hf_model_name']}) is not a SigLIP text tower"
        )
    if cfg.get("pool_type", "argmax") != "last" or not cfg.get("no_causal_mask", False):
        raise ValueError(
            f"{source}: text_cfg pool_type={cfg.get('pool_type', 'argmax')!r}, no_causal_mask="
            f"{cfg.get('no_causal_mask', False)}: SigLIP's text tower is bidirectional with last-token "
            "pooling"
        )
    if model_cfg.get("quick_gelu"):
        raise ValueError(f"{source}: quick_gelu is not a SigLIP activation")
    tanh = (cfg.get("act_kwargs") or {}).get("approximate") == "tanh"
    return TextConfig(
        num_attention_heads=int(cfg.get("heads", 8)),
        layer_norm_eps=float(
            (cfg.get("norm_kwargs") or {}).get("eps", 1e-5)
        ),  # open_clip's LayerNorm default
        hidden_act="gelu_pytorch_tanh" if tanh else "gelu",
        **text_shape(sd),
    )


def siglip_config(model_cfg: dict[str, Any], sd: dict[str, Tensor], source: str) -> SiglipConfig:
    """Both towers' configs from ``model_cfg`` and a state dict already in our ``SiglipModel`` layout."""
    config = SiglipConfig(
        vision_config(model_cfg, part(sd, "vision."), source),
        text_config(model_cfg, part(sd, "text."), source),
    )
    if "init_logit_bias" in model_cfg:
        config.logit_bias_init = float(model_cfg["init_logit_bias"])
    if "init_logit_scale" in model_cfg:
        config.logit_scale_init = float(model_cfg["init_logit_scale"])
    return config


def open_clip_config(config: SiglipConfig, *, allow_gelu_change: bool = False) -> dict[str, Any]:
    """``open_clip_config.json`` that ``open_clip.create_model`` builds this model from.

    open_clip builds the image tower from a timm architecture name alone, so the tower must have
    the exact shape of a registered one (:func:`.timm.register_timm_arch` adds your own). timm
    runs some SigLIP shapes with the exact GELU where the weights were trained with the tanh one
    (``vit_so400m_patch14_siglip_*``, the B/16s): ``allow_gelu_change`` accepts that, as open_clip's
    own releases of those weights do."""
    v, t = config.vision, config.text
    name = timm.arch_for(v)
    other_gelu = timm.arch_for(replace(v, hidden_act=_OTHER_GELU[v.hidden_act]))
    if name is None and other_gelu is not None and allow_gelu_change:
        name = other_gelu
    if name is None:
        hint = (
            f"; timm's {other_gelu} has this shape with the other GELU ({_OTHER_GELU[v.hidden_act]}): "
            f"allow_gelu_change=True (--allow-gelu-change) writes it as that, as open_clip's own releases do"
            if other_gelu
            else ""
        )
        raise ValueError(
            f"open_clip builds image towers from timm architecture names only, and no registered one "
            f"has this shape (patch {v.patch_size}, width {v.hidden_size}, depth {v.num_hidden_layers}, "
            f"heads {v.num_attention_heads}, mlp {v.intermediate_size}, {v.image_size} px, {v.hidden_act}, "
            f"head {v.use_head}){hint}; register one with vision_tower.formats.timm.register_timm_arch, "
            f"or write format='timm' (image tower) or 'transformers'"
        )
    text_cfg: dict[str, Any] = {
        "context_length": t.max_position_embeddings,
        "vocab_size": t.vocab_size,
        "width": t.hidden_size,
        "heads": t.num_attention_heads,
        "layers": t.num_hidden_layers,
        "mlp_ratio": timm.mlp_ratio(t.hidden_size, t.intermediate_size),
        "no_causal_mask": True,
        "proj_bias": True,
        "pool_type": "last",
        "norm_kwargs": {"eps": t.layer_norm_eps},
    }
    if t.hidden_act == "gelu_pytorch_tanh":
        text_cfg["act_kwargs"] = {"approximate": "tanh"}
    model_cfg = {
        "embed_dim": t.projection_size,
        "init_logit_scale": config.logit_scale_init,
        "init_logit_bias": config.logit_bias_init,
        "custom_text": True,
        "vision_cfg": {
            "image_size": v.image_size,
            "timm_model_name": name,
            "timm_model_pretrained": False,
            "timm_pool": "map" if v.use_head else "avg",
            "timm_proj": "none",
        },
        "text_cfg": text_cfg,
    }
    preprocess = {"mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic", "resize_mode": "squash"}
    return {"model_cfg": model_cfg, "preprocess_cfg": preprocess}


# ----------------------------------------------------------------------------- the format
ANCHOR = VISION_PREFIX + "patch_embed.proj.weight"


def _model_cfg(files: Files, source: str) -> dict[str, Any]:
    found = files.extra.get(CONFIG_NAME)
    if found is None or "model_cfg" not in found:
        raise CheckpointError(
            f"{source} is an open_clip checkpoint: put its {CONFIG_NAME} (with 'model_cfg') beside it"
        )
    return found["model_cfg"]


def read_vision(files: Files, source: str) -> Read:
    model_cfg = _model_cfg(files, source)
    sd = files.state_dict
    native, leftover = timm.vision_to_native(part(sd, VISION_PREFIX))
    leftover = [VISION_PREFIX + k for k in leftover]
    leftover += [k for k in sd if k.startswith("visual.") and not k.startswith(VISION_PREFIX)]
    return native, with_source(vision_config, model_cfg, native, source), leftover


def read_siglip(files: Files, source: str) -> Read:
    model_cfg = _model_cfg(files, source)
    native, leftover = to_native(files.state_dict)
    return native, with_source(siglip_config, model_cfg, native, source), leftover


def write_vision(config: Any, sd: StateDict, out_dir: OutDir) -> Path:
    raise ValueError("open_clip checkpoints hold both towers: save a SiglipModel with format='open_clip'")


def write_siglip(
    config: SiglipConfig, sd: StateDict, out_dir: OutDir, *, allow_gelu_change: bool = False
) -> Path:
    """``open_clip_model.safetensors`` + ``open_clip_config.json`` (``allow_gelu_change``: see
    :func:`open_clip_config`)."""
    cfg = open_clip_config(config, allow_gelu_change=allow_gelu_change)  # first: raises if open_clip cannot
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in from_native(sd).items()}
    save_safetensors(tensors, out / WEIGHTS_NAME, metadata={"format": "pt"})
    (out / CONFIG_NAME).write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    return out


FORMAT = register_format(
    Format(
        "open_clip",
        where="timm/ViT-*-SigLIP* (open_clip_model.safetensors + open_clip_config.json)",
        looks_for=repr(ANCHOR),
        detect=lambda keys: ANCHOR in keys,
        read_vision=read_vision,
        read_siglip=read_siglip,
        write_vision=write_vision,
        write_siglip=write_siglip,
        config_files=(CONFIG_NAME,),
        non_vision_prefixes=(TEXT_PREFIX,),
    )
)
