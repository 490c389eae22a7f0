"""transformers' ``LlavaForConditionalGeneration`` layout: a Gemma, Qwen or Llama decoder behind a
``linear`` or ``mlp2x_gelu`` connector on a raw block output of the tower, with causal attention."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from vision_tower import CheckpointError
from vision_tower.checkpoint import strict_load

from ..decoder import FAMILIES, IMAGE_TOKEN, family
from ..mlp import ACTIVATIONS, LinearConnector, MLPConnector
from ..parts import VLMParts
from .common import (
    FormatError,
    check_fixed_layout,
    check_plain_decoder,
    folder_parts,
    multimodal_decoder,
    read_multimodal,
    split_weights,
    write_multimodal,
    write_processor_template,
)
from .towers import expect_keys, projector_tensors, tower_from_tensors

_PROJECTOR_KEYS = {"linear_1.weight", "linear_2.weight"}
architecture = "LlavaForConditionalGeneration"  # the transformers class that loads this format


def check(vlm: VLMParts) -> None:
    """Refuse what LLaVA cannot express, saying which format can hold it (``vlm``: the parts, or the
    VisionLanguageModel, which has the same attributes)."""
    check_plain_decoder(vlm.decoder, "llava")
    check_fixed_layout(vlm, "llava")
    check_projection(vlm, "LLaVA")


def check_projection(vlm: VLMParts, title: str) -> None:
    """What LLaVA and its tiled successors (``title``: the family named in the messages) share: a Gemma,
    Qwen or Llama decoder without final soft-capping behind a ``linear`` or ``mlp2x_gelu`` connector on a raw
    block output of the tower, with causal attention."""
    fixed = vlm.layout.name == "fixed"  # PaliGemma holds fixed-layout VLMs only
    elsewhere = (
        "format='paligemma' (Gemma-family, prefix attention) or format='native'"
        if fixed
        else ("format='native'")
    )
    fam = family(vlm.decoder)
    if fam not in FAMILIES:
        raise FormatError(
            f"{title} export is tested for {', '.join(FAMILIES)} decoders, not {fam!r}: save format='native'"
        )
    if getattr(vlm.decoder.config, "final_logit_softcapping", None):
        raise FormatError(
            f"{title}'s head applies no final-logit soft-capping, which this {fam} decoder needs: "
            f"save {elsewhere}"
        )
    c = vlm.connector
    mlp_ok = c.name == "mlp" and c.options["depth"] == 2 and c.options["hidden_dim"] in (None, c.out_dim)
    if c.name != "linear" and not mlp_ok:
        raise FormatError(
            f"{title}'s projector is Linear, activation, Linear of the decoder's width; this VLM's connector "
            f"is {c.name!r} {c.options}: use 'linear' or 'mlp2x_gelu', or save format='native'"
        )
    if vlm.attention != "causal":
        prefix = vlm.attention == "prefix"
        fix = (
            "format='paligemma' (Gemma decoders) or "
            if prefix and fixed and fam in ("gemma", "gemma2")
            else ""
        )
        raise FormatError(
            f"{title} attends causally everywhere; this VLM uses {vlm.attention} attention: save "
            f"{fix}format='native', or build the VLM with attention='causal'"
        )
    if vlm.tower.feature_layer == -1:
        others = "format='paligemma' / 'native'" if fixed else "format='native'"
        raise FormatError(
            f"{title} reads raw block outputs (hidden_states[k]); this VLM reads the tower's post-layernorm "
            f"final output (feature_layer=-1): use feature_layer=-2 (LLaVA's choice) or save {others}"
        )


def _projector(
    parts: VLMParts, connector: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], str, bool]:
    """(projector tensors, projector_hidden_act, bias); ``linear`` becomes linear_1, identity, linear_2 =
    I."""
    bias = bool(parts.connector.options["bias"])
    if parts.connector.name == "mlp":
        out = {f"linear_1.{k[len('mlp.0.') :]}": v for k, v in connector.items() if k.startswith("mlp.0.")}
        out.update(
            {f"linear_2.{k[len('mlp.2.') :]}": v for k, v in connector.items() if k.startswith("mlp.2.")}
        )
        return out, parts.connector.options["act"], bias
    w = connector["proj.weight"]
    out = {"linear_1.weight": w, "linear_2.weight": torch.eye(w.shape[0], dtype=w.dtype)}
    if bias:
        out["linear_1.bias"] = connector["proj.bias"]
        out["linear_2.bias"] = torch.zeros(w.shape[0], dtype=w.dtype)
    return out, "linear", bias


def save(parts: VLMParts, out: Path, state_dict: dict[str, torch.Tensor]) -> None:
    check(parts)
    write(
        parts,
        out,
        state_dict,
        architecture=architecture,
        model_type="llava",
        fields={"image_seq_length": parts.num_image_tokens},
        # LlavaProcessor expands each <image> of a prompt into one placeholder per patch from these
        processor_config={
            "processor_class": "LlavaProcessor",
            "patch_size": parts.tower.config.patch_size,
            "num_additional_image_tokens": 0,
        },
    )


def write(
    parts: VLMParts,
    out: Path,
    state_dict: dict[str, torch.Tensor],
    *,
    architecture: str,
    model_type: str,
    fields: dict[str, Any],
    processor_config: dict[str, Any],
    processor_fields: dict[str, Any] | None = None,
) -> None:
    """A LLaVA-family folder (checked already): the keys every LLaVA config holds, then ``fields``; the
    multimodal processor's arguments every LLaVA processor takes, then ``processor_config``;
    ``processor_fields`` added to ``preprocessor_config.json``; the chat template as the processor applies
    it."""
    split = split_weights(parts.decoder, state_dict)
    projector, act, bias = _projector(parts, split["connector"])
    write_multimodal(
        parts,
        split,
        projector,
        out,
        architecture=architecture,
        model_type=model_type,
        fields={
            "vision_feature_layer": parts.tower.feature_layer,
            "vision_feature_select_strategy": "full",
            "projector_hidden_act": act,
            "multimodal_projector_bias": bias,
            **fields,
        },
        processor_config={
            "vision_feature_select_strategy": "full",
            "image_token": _image_token(parts),
            **processor_config,
        },
        processor_fields=processor_fields,
    )
    write_processor_template(parts, out, _image_token(parts))


def _image_token(parts: VLMParts) -> str:
    tokenizer = parts.tokenizer
    return IMAGE_TOKEN if tokenizer is None else str(tokenizer.convert_ids_to_tokens(parts.image_token_id))


def _connector(proj: dict[str, torch.Tensor], act: str, bias: bool, source: str):
    """``linear`` when the checkpoint's projector is linear_1 then identity, else ``mlp2x`` with its
    activation."""
    w1, w2 = proj["linear_1.weight"], proj["linear_2.weight"]
    identity = (
        act == "linear"
        and w2.shape[0] == w2.shape[1]
        and torch.equal(w2, torch.eye(w2.shape[0], dtype=w2.dtype))
        and (not bias or not proj["linear_2.bias"].any())
    )
    if identity:
        connector = LinearConnector(w1.shape[1], w1.shape[0], bias=bias)
        target = {"proj.weight": w1, **({"proj.bias": proj["linear_1.bias"]} if bias else {})}
    else:
        if act not in ACTIVATIONS:
            raise CheckpointError(
                f"{source}: projector_hidden_act {act!r} is not supported; known: {sorted(ACTIVATIONS)}"
            )
        connector = MLPConnector(w1.shape[1], w2.shape[0], depth=2, act=act, bias=bias)
        target = {k.replace("linear_1.", "mlp.0.").replace("linear_2.", "mlp.2."): v for k, v in proj.items()}
    strict_load(connector, target, source=f"{source} (multi_modal_projector)")
    return connector


def load(path: Path, config: dict[str, Any], *, dtype, device) -> VLMParts:
    hf, sd = read_multimodal(path)
    return read(path, hf, sd, dtype=dtype, device=device)


def read(
    path: Path, hf: Any, sd: dict[str, torch.Tensor], *, dtype, device, extra: tuple[str, ...] = ()
) -> VLMParts:
    """The parts of a LLaVA-family checkpoint from its transformers config ``hf`` and its tower and projector
    tensors ``sd`` (``extra``: the prefixes of its other non-decoder tensors); the image layout is left
    ``fixed``."""
    source = str(path)
    layer, strategy = hf.vision_feature_layer, hf.vision_feature_select_strategy
    if not isinstance(layer, int):
        raise CheckpointError(
            f"{source}: vision_feature_layer {layer!r} concatenates several layers; not supported"
        )
    if strategy != "full":
        raise CheckpointError(
            f"{source}: vision_feature_select_strategy {strategy!r} drops the first token (CLIP's CLS); "
            f"SigLIP towers have none: only 'full' is supported"
        )
    depth = hf.vision_config.num_hidden_layers
    # LLaVA's -1 is hidden_states[-1], the last block's raw output; the tower's -1 means post-layernorm
    layer = depth if layer == -1 else layer
    tower = tower_from_tensors(sd, hf.vision_config, source=source, feature_layer=layer, dtype=dtype)
    bias = bool(getattr(hf, "multimodal_projector_bias", True))
    proj = projector_tensors(sd, source)
    expect_keys(proj, _PROJECTOR_KEYS | ({"linear_1.bias", "linear_2.bias"} if bias else set()), source)
    connector = _connector(proj, hf.projector_hidden_act, bias, source)
    decoder = multimodal_decoder(path, hf.text_config, dtype=dtype, device=device, extra=extra)
    return folder_parts(
        path, tower, connector, decoder, image_token_id=int(hf.image_token_id), attention="causal"
    )
