"""Write our state dicts in the layout another framework loads unchanged: transformers, timm, open_clip."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from .checkpoint import write_safetensors
from .config import NaFlexVisionConfig, SiglipConfig, VisionConfig
from .formats import open_clip, timm
from .formats import transformers as hf
from .formats.keys import part

Tensor = torch.Tensor

FORMATS = ("hf", "timm", "open_clip")


def check_format(format: str) -> str:
    if format not in FORMATS:
        raise ValueError(f"unknown checkpoint format {format!r}; choose one of {FORMATS}")
    return format


def vision_state_dict_hf(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """An image tower's state dict (ours) under transformers' names with the ``vision_model.`` infix."""
    return {f"vision_model.{k}": v for k, v in hf.vision_from_native(sd).items()}


def write_vision_weights(
    config: VisionConfig | NaFlexVisionConfig,
    sd: dict[str, Tensor],
    out_dir: str | os.PathLike,
    format: str = "hf",
) -> Path:
    """An image tower in ``format``: ``hf`` is transformers' ``SiglipVisionModel`` (``Siglip2VisionModel``
    for NaFlex) layout, ``timm`` is timm's ``model.safetensors`` + ``config.json``."""
    check_format(format)
    naflex = isinstance(config, NaFlexVisionConfig)
    if format == "open_clip":
        raise ValueError("open_clip checkpoints hold both towers: save a SiglipModel with format='open_clip'")
    if format == "timm":
        if naflex:
            raise ValueError("NaFlex towers are written in the transformers layout only (format='hf')")
        return write_safetensors(timm.vision_from_native(sd), out_dir, timm.timm_config(config))
    arch = "Siglip2VisionModel" if naflex else "SiglipVisionModel"
    return write_safetensors(vision_state_dict_hf(sd), out_dir, {"architectures": [arch], **config.to_hf()})


def write_siglip_weights(
    config: SiglipConfig,
    sd: dict[str, Tensor],
    out_dir: str | os.PathLike,
    format: str = "hf",
    *,
    allow_gelu_change: bool = False,
) -> Path:
    """Both towers, t' and b in ``format``: ``hf`` is transformers' ``SiglipModel`` layout, ``open_clip``
    is ``open_clip_model.safetensors`` + ``open_clip_config.json`` (``allow_gelu_change``: see
    :func:`.formats.open_clip.open_clip_config`)."""
    check_format(format)
    if format == "timm":
        raise ValueError(
            "timm checkpoints hold the image tower only: save model.vision with format='timm', "
            "or both towers with format='open_clip'"
        )
    if format == "open_clip":
        cfg = open_clip.open_clip_config(
            config, allow_gelu_change=allow_gelu_change
        )  # first: raises if open_clip cannot build this model
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in open_clip.from_native(sd).items()}
        save_file(tensors, out / open_clip.WEIGHTS_NAME, metadata={"format": "pt"})
        (out / open_clip.CONFIG_NAME).write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
        return out
    tensors = vision_state_dict_hf(part(sd, "vision."))
    tensors.update({f"text_model.{k}": v for k, v in hf.text_from_native(part(sd, "text.")).items()})
    tensors["logit_scale"] = sd["logit_scale"]
    tensors["logit_bias"] = sd["logit_bias"]
    return write_safetensors(tensors, out_dir, config.to_hf())
