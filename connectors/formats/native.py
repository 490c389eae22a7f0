"""The native layout: holds every tower, connector, decoder and attention this package builds.

config.json              model_type "vision_tower_vlm": attention, image token, tower feature layer, connector
tower/                   the image tower, transformers SiglipVisionModel layout
connector.safetensors    the connector's weights (its names)
decoder/                 the causal LM as transformers saves it (AutoModelForCausalLM loads it alone)
tokenizer files, preprocessor_config.json   when the VLM has them
tower_swap.json          which tower replaced which, when a tower swap made the VLM (every format writes it)
layout.safetensors       the image layout's learned tensors (``image_newline``), when it has any

config.json's ``image_layout`` ({"name", "options"}) is optional: a checkpoint without it has the ``fixed``
layout (what every format version 1 folder written before layouts holds).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from vision_tower import VisionTower
from vision_tower.checkpoint import (
    JSON_TYPE_NAMES,
    json_type_fits,
    read_weights,
    save_safetensors,
    strict_load,
)
from vision_tower.saving import write_vision_weights

from ..decoder import load_decoder
from ..layouts import LayoutConfig
from ..parts import NATIVE_MODEL_TYPE, VLMParts
from ..registry import ConnectorConfig
from .common import MAX_SHARD_SIZE, check_plain_decoder, folder_parts, split_weights, write_extras

MODEL_TYPE = NATIVE_MODEL_TYPE
FORMAT_VERSION = 1
architecture = None  # no transformers class: this package's own layout
# config.json keys and the JSON type of each
_KEYS = {
    "model_type": str,
    "format_version": int,
    "attention": str,
    "image_token_id": int,
    "feature_layer": int,
    "connector": dict,
    "decoder": str,
}
_OPTIONAL = {"image_layout": dict}


def check(parts: VLMParts) -> None:
    """Every tower, connector, image layout, decoder family and attention: only a plain decoder (a peft
    wrapper saves its adapters alone)."""
    check_plain_decoder(parts.decoder, "native")


def save(parts: VLMParts, out: Path, state_dict: dict[str, torch.Tensor]) -> None:
    check(parts)
    split = split_weights(parts.decoder, state_dict)
    out.mkdir(parents=True, exist_ok=True)
    write_vision_weights(parts.tower.config, split["tower"], out / "tower")
    save_safetensors(
        {k: v.detach().contiguous().cpu() for k, v in split["connector"].items()},
        out / "connector.safetensors",
    )
    parts.decoder.save_pretrained(out / "decoder", state_dict=split["decoder"], max_shard_size=MAX_SHARD_SIZE)
    config = {
        "model_type": MODEL_TYPE,
        "format_version": FORMAT_VERSION,
        "attention": parts.attention,
        "image_token_id": parts.image_token_id,
        "feature_layer": parts.tower.feature_layer,
        "connector": parts.connector.config.to_dict(),
        "decoder": str(parts.decoder.config.model_type),
        "image_layout": parts.layout.to_dict(),
    }
    if split["layout_params"]:
        save_safetensors(
            {k: v.detach().contiguous().cpu() for k, v in split["layout_params"].items()},
            out / "layout.safetensors",
        )
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    write_extras(parts, out)


def read_config(config: dict[str, Any], source: str) -> dict[str, Any]:
    unknown = sorted(set(config) - set(_KEYS) - set(_OPTIONAL))
    missing = sorted(set(_KEYS) - set(config))
    if unknown or missing:
        raise ValueError(f"{source}/config.json: unknown keys {unknown}, missing keys {missing}")
    for key, kind in {**_KEYS, **_OPTIONAL}.items():
        if key in config and not json_type_fits(config[key], kind):
            raise ValueError(
                f"{source}/config.json: field {key!r} must be {JSON_TYPE_NAMES[kind]}, found "
                f"{json.dumps(config[key])[:80]}"
            )
    if config["format_version"] != FORMAT_VERSION:
        raise ValueError(f"{source}: format_version {config['format_version']} is not {FORMAT_VERSION}")
    return config


def load(path: Path, config: dict[str, Any], *, dtype, device) -> VLMParts:
    config = read_config(config, str(path))
    tower = VisionTower.from_pretrained(
        path / "tower", feature_layer=config["feature_layer"], use_head=False, dtype=dtype
    )
    try:
        connector = ConnectorConfig.from_dict(config["connector"]).build()
    except ValueError as err:  # an unknown option or one of the wrong type, edited into the saved config
        raise ValueError(f"{path / 'config.json'}: connector: {err}") from None
    file = path / "connector.safetensors"
    strict_load(connector, read_weights(file), source=str(file))  # header, names, shapes and dtypes checked
    try:
        layout = LayoutConfig.from_dict(config.get("image_layout", {}))
    except ValueError as err:
        raise ValueError(f"{path / 'config.json'}: image_layout: {err}") from None
    file = path / "layout.safetensors"
    learned = read_weights(file) if file.exists() else {}
    decoder = load_decoder(path / "decoder", dtype=dtype, device=device)
    parts = folder_parts(
        path,
        tower,
        connector,
        decoder,
        image_token_id=config["image_token_id"],
        attention=config["attention"],
    )
    parts.layout, parts.layout_params = layout, learned
    return parts
