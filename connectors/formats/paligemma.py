"""transformers' ``PaliGemmaForConditionalGeneration`` layout: a Gemma-family decoder behind a ``linear``
connector on the tower's final (post-layernorm) output, with prefix attention."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from vision_tower.checkpoint import strict_load

from ..decoder import family
from ..mlp import LinearConnector
from ..parts import VLMParts
from . import common
from .common import FormatError
from .towers import expect_keys, projector_tensors, tower_from_tensors

# text model types transformers 5.x accepts in PaliGemma (PaliGemma 1: Gemma, PaliGemma 2: Gemma 2)
DECODERS = ("gemma", "gemma2")
architecture = "PaliGemmaForConditionalGeneration"  # the transformers class that loads this format


def check(vlm: VLMParts) -> None:
    """Refuse what PaliGemma cannot express, saying which format can hold it (``vlm``: the parts, or the
    VisionLanguageModel, which has the same attributes)."""
    common.check_plain_decoder(vlm.decoder, "paligemma")
    common.check_fixed_layout(vlm, "paligemma")
    fam = family(vlm.decoder)
    if fam not in DECODERS:
        raise FormatError(
            f"PaliGemma takes a Gemma-family decoder ({', '.join(DECODERS)}); this VLM's is {fam!r}: "
            f"save format='llava' (with attention='causal') or format='native'"
        )
    if vlm.connector.name != "linear":
        raise FormatError(
            f"PaliGemma's projector is one linear layer; this VLM's connector is {vlm.connector.name!r}: "
            f"save format='native' (or 'llava' for mlp2x_gelu)"
        )
    if vlm.attention != "prefix":
        raise FormatError(
            "PaliGemma attends bidirectionally over image and prompt; this VLM uses "
            f"{vlm.attention} attention: save format='llava' or format='native'"
        )
    if vlm.tower.feature_layer != -1:
        raise FormatError(
            f"PaliGemma feeds the tower's final post-layernorm output (feature_layer=-1); this VLM reads "
            f"feature_layer={vlm.tower.feature_layer}: save format='llava' or format='native'"
        )


def save(parts: VLMParts, out: Path, state_dict: dict[str, torch.Tensor]) -> None:
    check(parts)
    split = common.split_weights(parts.decoder, state_dict)
    hidden = parts.connector.out_dim
    projector = {f"linear.{k.removeprefix('proj.')}": v for k, v in split["connector"].items()}
    if "linear.bias" not in projector:  # a bias-free linear connector: PaliGemma's bias is zero
        projector["linear.bias"] = torch.zeros(hidden, dtype=projector["linear.weight"].dtype)
    text = {**common.text_config(parts.decoder), "use_bidirectional_attention": True}
    common.write_multimodal(
        parts,
        split,
        projector,
        out,
        architecture=architecture,
        model_type="paligemma",
        vision_config={**parts.tower.config.to_hf(), "projection_dim": hidden},
        text=text,
        fields={"projection_dim": hidden, "hidden_size": hidden, "vocab_size": text["vocab_size"]},
        processor_fields={
            "image_seq_length": parts.num_image_tokens,
            "processor_class": "PaliGemmaProcessor",
        },
    )


def load(path: Path, config: dict[str, Any], *, dtype, device) -> VLMParts:
    hf, sd = common.read_multimodal(path)
    tower = tower_from_tensors(sd, hf.vision_config, source=str(path), feature_layer=-1, dtype=dtype)
    proj = projector_tensors(sd, str(path))
    expect_keys(proj, {"linear.weight", "linear.bias"}, str(path))
    connector = LinearConnector(tower.config.hidden_size, proj["linear.weight"].shape[0])
    tensors = {"proj.weight": proj["linear.weight"], "proj.bias": proj["linear.bias"]}
    strict_load(connector, tensors, source=f"{path} (multi_modal_projector)")
    text = hf.text_config
    if getattr(text, "use_bidirectional_attention", None):
        text.use_bidirectional_attention = False  # the VLM passes its prefix mask itself
    decoder = common.multimodal_decoder(path, text, dtype=dtype, device=device)
    return common.folder_parts(
        path, tower, connector, decoder, image_token_id=int(hf.image_token_id), attention="prefix"
    )
