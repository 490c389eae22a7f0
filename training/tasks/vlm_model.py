"""The VLM of a training stage: built (partitioned as it is built at ZeRO-3), frozen where the stage says,
LoRA adapters added, activation checkpointing on; and the plain model its consolidated weights are
exported from (adapters merged)."""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from connectors import VisionLanguageModel
from connectors.decoder import check_tokenizer_fits, config_rows, load_decoder, load_tokenizer
from connectors.decoder_presets import build_decoder, preset_decoder_name
from connectors.formats import FORMATS, FormatError, decoder_rows
from connectors.formats import check as check_format
from vision_tower import VisionTower
from vision_tower.sources import load_tower, processor_for

from ..runner.config import resolve_path
from ..runner.zero import Zero
from .vlm_config import VLMConfig, VLMModelSection

log = logging.getLogger(__name__)
LORA_MARK = ".lora_"


@dataclass
class StageModel:
    """The built model and what the stage needs to remember about it."""

    vlm: VisionLanguageModel
    formats: list[str]  # export formats that can hold it
    keep_alive: Any = None  # transformers' HfDeepSpeedConfig at ZeRO-3 (read while it lives)


def zero3_context(zero: Zero) -> Any:
    """An ``HfDeepSpeedConfig`` at stage 3 (transformers partitions decoders as it builds or loads them
    while one is alive), else None."""
    if zero.stage != 3:
        return None
    from transformers.integrations import HfDeepSpeedConfig

    return HfDeepSpeedConfig(zero.ds_config)


def assemble(m: VLMModelSection, dtype: torch.dtype) -> VisionLanguageModel:
    """Tower, connector and decoder of ``model`` put together (random connector; random decoder for a
    preset). Under a live ``HfDeepSpeedConfig`` the decoder is partitioned as it is built or loaded."""
    tower_src = resolve_path(m.tower)
    tower = load_tower(tower_src, image_size=m.image_size, feature_layer=m.feature_layer, use_head=False)
    if not isinstance(tower, VisionTower):
        raise ValueError(f"model.tower {m.tower}: a NaFlex tower cannot be put in a VisionLanguageModel")
    processor = processor_for(tower_src, tower.config.image_size)
    preset = preset_decoder_name(m.decoder)
    tokenizer_src = resolve_path(m.tokenizer or m.decoder)
    tokenizer = load_tokenizer(tokenizer_src)
    if tokenizer is None:
        raise ValueError(f"no tokenizer files in {tokenizer_src}: set model.tokenizer to a tokenizer folder")
    if preset is not None:
        _add_image_token(tokenizer)
        decoder = build_decoder(preset, tokenizer, dtype=dtype, **m.decoder_options)
    else:
        decoder = load_decoder(resolve_path(m.decoder), dtype=dtype)
    return VisionLanguageModel(
        tower,
        m.connector,
        decoder,
        attention=m.attention,
        connector_options=m.connector_options,
        tokenizer=tokenizer,
        processor=processor,
        image_layout=m.image_layout or "fixed",
        layout_options=m.layout_options,
    )


def set_layout(vlm: VisionLanguageModel, m: VLMModelSection) -> VisionLanguageModel:
    """The saved VLM with ``model.image_layout`` (and its options) in place of its saved layout: the same
    tower, connector and decoder in a new model, whose learned layout parameters (``image_newline``) are
    the saved ones where the names and shapes agree, else fresh (a ``fixed`` stage 1 gives none). The
    saved layout stays when the config sets none or the same one."""
    if m.image_layout is None:
        return vlm
    settings = {**vlm.settings(), "image_layout": m.image_layout, "layout_options": m.layout_options}
    new = VisionLanguageModel(vlm.tower, vlm.connector, vlm.decoder, **settings)
    if new.image_layout == vlm.image_layout:  # the same name and options (defaults filled in)
        return vlm
    new.layout_params.to(next(vlm.connector.parameters()).dtype)
    new.source = vlm.source
    kept = []
    for name, param in new.layout_params.items():
        saved = vlm.layout_params.get(name)
        if saved is not None and saved.shape == param.shape:
            param.data.copy_(saved.data)
            kept.append(name)
    fresh = sorted(set(new.layout_params) - set(kept))
    log.info(
        "model.image_layout %s replaces the layout %s of %s (%s kept, %s fresh)",
        new.image_layout.to_dict(),
        vlm.image_layout.to_dict(),
        m.init_from,
        ", ".join(kept) or "no parameters",
        ", ".join(fresh) or "none",
    )
    return new


def swap_tower(vlm: VisionLanguageModel, m: VLMModelSection, dtype: torch.dtype) -> None:
    """``model.tower`` in place of the saved VLM's tower (at ``image_size``, read at ``feature_layer``,
    default the saved one's), with the saved connector's kind rebuilt for its width (or ``model.connector``
    with its options, or the saved connector kept); the processor follows the new tower. Decoder,
    tokenizer, image token and attention stay; ``vlm.tower_swap`` records what changed."""
    tower_src = resolve_path(m.tower)
    layer = vlm.tower.feature_layer if m.feature_layer is None else m.feature_layer
    tower = load_tower(tower_src, image_size=m.image_size, feature_layer=layer, use_head=False)
    if not isinstance(tower, VisionTower):
        raise ValueError(f"model.tower {m.tower}: a NaFlex tower cannot be put in a VisionLanguageModel")
    if m.keep_connector and tower.config.hidden_size != vlm.connector.in_dim:
        raise ValueError(
            f"model.keep_connector: the saved connector takes {vlm.connector.in_dim}-wide features, "
            f"model.tower {m.tower} gives {tower.config.hidden_size}: drop model.keep_connector (a fresh "
            "connector of the new width is fitted)"
        )
    connector = vlm.connector if m.keep_connector else m.connector
    before = vlm.num_image_tokens
    vlm.replace_tower(
        tower.to(dtype),
        connector,
        processor=processor_for(tower_src, tower.config.image_size),
        source=m.tower,
        **m.connector_options,
    )
    log.info(
        "model.tower %s replaces the tower of %s: %s connector %d -> %d (%s), %d -> %d tokens per image",
        m.tower,
        m.init_from,
        vlm.connector.name,
        vlm.connector.in_dim,
        vlm.connector.out_dim,
        vlm.tower_swap["connector"],
        before,
        vlm.num_image_tokens,
    )


def check_vocabulary(m: VLMModelSection) -> None:
    """The tokenizer against the decoder's input embedding table, from their files (before any set-up):
    every id the tokenizer produces must be a row (:func:`connectors.decoder.check_tokenizer_fits`). A
    preset decoder is sized to the tokenizer; a missing tokenizer is reported where the model is built."""
    if m.init_from:
        src = resolve_path(m.init_from)
        tokenizer, rows, key = load_tokenizer(src), decoder_rows(src), f"model.init_from {m.init_from}"
    elif preset_decoder_name(m.decoder) is None:
        tokenizer_src = resolve_path(m.tokenizer or m.decoder)
        tokenizer, rows = load_tokenizer(tokenizer_src), config_rows(resolve_path(m.decoder))
        key = f"model.tokenizer {m.tokenizer}" if m.tokenizer else f"model.decoder {m.decoder}"
    else:
        return
    if tokenizer is not None:
        check_tokenizer_fits(tokenizer, rows, name=key)
        if tokenizer.eos_token_id is None:
            raise ValueError(
                f'the tokenizer of {key} has no eos token, and answers need one to end: set "eos_token" '
                'in its tokenizer_config.json to the decoder\'s end-of-turn token (e.g. "<eos>", '
                '"</s>", "<|im_end|>"), or give model.tokenizer a folder whose tokenizer has one'
            )


def _add_image_token(tokenizer: Any) -> None:
    """``<image>`` in the tokenizer before a preset decoder is sized to it (no embedding resize later)."""
    from transformers import AddedToken

    from connectors.decoder import IMAGE_TOKEN

    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)


def build_stage_model(cfg: VLMConfig, zero: Zero, dtype: torch.dtype) -> StageModel:
    """The stage's VLM: built or loaded (``model.init_from``), tower identity taken before anything is
    partitioned, trainable parts set, LoRA added, checkpointing on, export formats checked, and at
    ZeRO-3 every part partitioned across the ranks."""
    keep_alive = zero3_context(zero)
    if cfg.model.init_from:
        vlm = VisionLanguageModel.from_pretrained(resolve_path(cfg.model.init_from), dtype=dtype)
        if cfg.model.swaps_tower:
            swap_tower(vlm, cfg.model, dtype)
        vlm = set_layout(vlm, cfg.model)
    else:
        vlm = assemble(cfg.model, dtype)
    if zero.stage == 3 and not all(hasattr(p, "ds_id") for p in vlm.decoder.parameters()):
        raise RuntimeError("ZeRO-3: the decoder was built whole, not partitioned as transformers loaded it")
    if cfg.data.feature_cache:  # refused now, before anything trains, if made with another tower or layout
        from ..data.feature_cache import FeatureCache, cache_identity

        FeatureCache(resolve_path(cfg.data.feature_cache)).check(
            cache_identity(vlm.tower, vlm.image_processor(), vlm.layout)
        )
    formats = export_formats(vlm, cfg.export.formats)
    set_stage(vlm, cfg)
    if cfg.model.gradient_checkpointing:
        vlm.gradient_checkpointing_enable(tower=cfg.tower_trains, decoder=True)
    for part in (vlm.tower, vlm.connector, vlm.decoder, vlm.layout_params):
        zero.partition(part)  # stage 3: the decoder's remaining (LoRA) parameters, tower and connector
    zero.external(vlm, list(vlm.layout_params.values()))  # read in the VLM's forward, not their module's
    return StageModel(vlm, formats, keep_alive)


def set_stage(vlm: VisionLanguageModel, cfg: VLMConfig) -> None:
    """``requires_grad`` and train/eval mode per part: text trains the decoder alone; align the connector;
    finetune the connector and the decoder (in full, or LoRA adapters on frozen weights), the tower if
    asked."""
    full_decoder = cfg.stage == "text" or (cfg.stage == "finetune" and cfg.finetune.decoder == "full")
    vlm.set_trainable(tower=cfg.tower_trains, connector=cfg.stage != "text", decoder=full_decoder)
    if cfg.stage == "finetune" and cfg.finetune.decoder == "lora":
        add_lora(vlm.decoder, cfg.finetune.lora)
    vlm.train()
    if not cfg.tower_trains:
        vlm.tower.eval()


def add_lora(decoder: nn.Module, lora: Any) -> None:
    """peft LoRA adapters injected in place on ``lora.target_modules`` (the decoder stays a transformers
    model; its other weights frozen); an unmatched name is an error listing the decoder's linear layers."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.target_modules)
    )
    linear = sorted(
        {n.rsplit(".", 1)[-1] for n, mod in decoder.named_modules() if isinstance(mod, nn.Linear)}
    )
    missing = [t for t in lora.target_modules if t not in linear]
    if missing:
        raise ValueError(
            f"finetune.lora.target_modules {missing} are not linear layers of this decoder; it has {linear}"
        )
    inject_adapter_in_model(config, decoder)


def lora_scaling(lora: Any) -> float:
    return float(lora.alpha) / float(lora.r)


def merge_lora(state: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """A state dict with LoRA adapters (peft's ``<layer>.base_layer.weight``,
    ``<layer>.lora_A.<name>.weight``,
    ``<layer>.lora_B.<name>.weight``) as plain weights: ``W + scaling * B @ A`` under ``<layer>.weight``."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if LORA_MARK in key:
            continue
        if ".base_layer." in key:
            layer, _, leaf = key.partition(".base_layer.")
            if leaf == "weight":
                a = _adapter(state, layer, "lora_A")  # (r, in)
                b = _adapter(state, layer, "lora_B")  # (out, r)
                value = (value.float() + scaling * (b.float() @ a.float())).to(value.dtype)
            key = f"{layer}.{leaf}"
        out[key] = value
    return out


def _adapter(state: dict[str, torch.Tensor], layer: str, which: str) -> torch.Tensor:
    found = [v for k, v in state.items() if k.startswith(f"{layer}.{which}.") and k.endswith(".weight")]
    if len(found) != 1:
        raise ValueError(f"{layer}: expected one {which} adapter weight, found {len(found)}")
    return found[0]


def export_formats(vlm: VisionLanguageModel, wanted: list[str] | None) -> list[str]:
    """The formats to export: those asked (each must hold the model: ``FormatError`` otherwise), or
    ``native`` and every other that can hold it."""
    out = []
    for fmt in wanted or list(FORMATS):
        try:
            check_format(vlm, fmt)
        except FormatError as err:
            if wanted:
                raise FormatError(f"export.formats lists {fmt!r}: {err}") from None
            log.info("not exporting %s: %s", fmt, err)
            continue
        out.append(fmt)
    return out


def plain_model(vlm: VisionLanguageModel) -> VisionLanguageModel:
    """A VLM of the same tower, connector and decoder configs on the meta device, without adapters
    (what consolidated weights are loaded into for export)."""
    decoder = vlm.decoder
    with torch.device("meta"):  # a plain constructor: no zero.Init even while an HfDeepSpeedConfig lives
        tower = VisionTower(copy.deepcopy(vlm.tower.config), feature_layer=vlm.tower.feature_layer)
        connector = vlm.connector.config.build()
        plain_decoder = type(decoder)(copy.deepcopy(decoder.config))
    return VisionLanguageModel(tower, connector, plain_decoder, **vlm.settings())


def load_plain(vlm: VisionLanguageModel, state: dict[str, torch.Tensor]) -> VisionLanguageModel:
    """``plain_model(vlm)`` with ``state`` (adapters merged) put in place; tied weights tied again."""
    model = plain_model(vlm)
    expected = model.state_dict()
    given = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    missing = sorted(set(expected) - set(given))
    tied = {id(p): name for name, p in model.named_parameters()}
    untied = [k for k in missing if tied.get(id(_lookup(model, k))) in (None, k)]
    buffers = {name for name, _ in model.named_buffers()}  # non-persistent ones are not saved
    unexpected = sorted(set(given) - set(expected) - buffers)
    given = {k: v for k, v in given.items() if k in expected}
    if untied or unexpected:
        raise ValueError(
            f"consolidated weights do not fit the model: missing {untied[:10]}, unexpected {unexpected[:10]}"
        )
    model.load_state_dict(given, strict=False, assign=True)
    live = {n.replace(".base_layer.", "."): b for n, b in vlm.named_buffers()}
    for name, buf in list(model.named_buffers()):
        if buf.is_meta:  # non-persistent buffers (rotary tables, scales): the live model's
            module_name, _, leaf = name.rpartition(".")
            model.get_submodule(module_name).register_buffer(
                leaf, live[name].detach().cpu().clone(), persistent=False
            )
    model.decoder.tie_weights()
    return model


def _lookup(model: nn.Module, name: str) -> torch.Tensor:
    module_name, _, leaf = name.rpartition(".")
    return getattr(model.get_submodule(module_name), leaf)
