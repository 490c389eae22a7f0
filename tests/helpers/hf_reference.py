"""Helpers that build tiny random transformers SigLIP models for parity tests."""

from __future__ import annotations

import logging

import torch
from transformers import (
    Siglip2VisionConfig,
    Siglip2VisionModel,
    SiglipConfig,
    SiglipModel,
    SiglipTextConfig,
    SiglipTextModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)

logging.getLogger("transformers").setLevel(logging.ERROR)


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> torch.nn.Module:
    """Perturb every parameter with distinct noise so a weight loaded into the wrong place shows.

    transformers initialises biases to zero and norms to one; those would hide a swapped bias.
    """
    gen = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.add_(torch.randn(p.shape, generator=gen) * scale)
    return module


def tiny_encoder(width: int, mlp: int, **fields) -> dict:
    """The fields of an encoder config (transformers' names) of the given widths: 2 blocks of 4 heads
    unless ``fields`` say otherwise."""
    return {
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        **fields,
        "hidden_size": width,
        "intermediate_size": mlp,
    }


def vision_config(**kw) -> SiglipVisionConfig:
    return SiglipVisionConfig(
        **{**tiny_encoder(48, 80, image_size=32, patch_size=8, vision_use_head=True), **kw}
    )


def text_config(**kw) -> SiglipTextConfig:
    base = tiny_encoder(
        40,
        72,
        vocab_size=97,
        max_position_embeddings=12,
        projection_size=40,
        pad_token_id=1,
        bos_token_id=None,
        eos_token_id=1,
    )
    base.update(kw)
    return SiglipTextConfig(**base)


def hf_vision(seed: int = 0, **kw) -> SiglipVisionModel:
    torch.manual_seed(seed)
    return randomize_(SiglipVisionModel(vision_config(**kw)).eval(), seed)


def hf_text(seed: int = 0, **kw) -> SiglipTextModel:
    torch.manual_seed(seed)
    return randomize_(SiglipTextModel(text_config(**kw)).eval(), seed)


def hf_siglip(seed: int = 0, vision: dict | None = None, text: dict | None = None) -> SiglipModel:
    torch.manual_seed(seed)
    vcfg = vision_config(**(vision or {}))
    tcfg = text_config(**{"projection_size": vcfg.hidden_size, **(text or {})})
    cfg = SiglipConfig(vision_config=vcfg.to_dict(), text_config=tcfg.to_dict())
    model = SiglipModel(cfg).eval()
    randomize_(model, seed)
    with torch.no_grad():
        model.logit_scale.fill_(2.3)
        model.logit_bias.fill_(-9.5)
    return model


def naflex_config(**kw) -> Siglip2VisionConfig:
    """A SigLIP 2 NaFlex tower: 8 px patches, a 4x4 table of positions, width 48, 3 blocks."""
    base = dict(
        hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4, patch_size=8
    )
    return Siglip2VisionConfig(**{**base, "num_patches": 16, **kw})


def hf_naflex(seed: int = 0, **kw) -> Siglip2VisionModel:
    torch.manual_seed(seed)
    return randomize_(Siglip2VisionModel(naflex_config(**kw)).eval(), seed)
