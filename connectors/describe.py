"""What a VLM checkpoint holds (tower, feature layer, connector, tokens per image, decoder, the tower swap
that made it), read from its config files alone: the weights are neither read nor downloaded; shapes are
built on the meta device."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from vision_tower import VisionConfig, VisionTower
from vision_tower.checkpoint import read_json
from vision_tower.formats.idefics3 import vision_config as idefics3_vision_config
from vision_tower.hub import resolve
from vision_tower.sources import preset_name

from .decoder import NO_CODE_FROM_FILES, no_code_from_files
from .formats import FORMATS, checkpoint_format, native
from .formats.idefics3 import IDEFICS3, SMOLVLM
from .formats.towers import vision_config_fields
from .layouts import CropShape, LayoutConfig
from .registry import ConnectorConfig
from .swap import read_swap, swap_lines


@dataclass
class VLMDescription:
    source: str
    format: str
    tower: dict[str, Any]
    feature_layer: int
    connector: dict[str, Any]
    tokens_per_image: int
    attention: str
    image_token_id: int
    decoder: dict[str, Any]
    params: dict[str, int] = field(default_factory=dict)
    tower_swap: dict[str, Any] | None = None  # the record of the tower swap that made it (connectors.swap)
    layout: Any = None  # the built ImageLayout (None: fixed)

    def image_tokens(self, sizes: list[tuple[int, int]] | None = None) -> dict[tuple[int, int], int]:
        """Tokens per image of each (height, width) in ``sizes``; default: the tower's size, and for a tiled
        layout also a 2:1, a 1:3 (document) and a large image."""
        side = self.tower["image_size"]
        if sizes is None:
            sizes = [(side, side)]
            if self.layout is not None and self.layout.name != "fixed":
                sizes += [(side, 2 * side), (3 * side, side), (4 * side, 4 * side)]
        if self.layout is None:
            return {(int(h), int(w)): self.tokens_per_image for h, w in sizes}
        return {(int(h), int(w)): self.layout.num_tokens((h, w)) for h, w in sizes}

    def lines(self, sizes: list[tuple[int, int]] | None = None) -> list[str]:
        """A short human-readable report; ``sizes``: the image sizes (height, width) to give the tokens of."""
        t, d, c = self.tower, self.decoder, self.connector
        side = t["image_size"] // t["patch_size"]
        layer = (
            "final, post-layernorm"
            if self.feature_layer == -1
            else f"block output hidden_states[{self.feature_layer}]"
        )
        opts = ", ".join(f"{k}={v}" for k, v in c["options"].items() if v is not None)
        swap = [] if self.tower_swap is None else swap_lines(self.tower_swap)
        return [
            f"source: {self.source} (vision-language model, {self.format} layout)",
            *swap,
            f"tower: SigLIP width {t['hidden_size']}, {t['num_hidden_layers']} blocks, patch "
            f"{t['patch_size']}, "
            f"{t['image_size']} px -> {side}x{side} tokens; {self.params['tower'] / 1e6:.2f}M parameters",
            f"feature layer: {self.feature_layer} ({layer})",
            f"connector: {c['name']} {c['in_dim']} -> {c['out_dim']}"
            + (f" ({opts})" if opts else "")
            + f"; {self.params['connector'] / 1e6:.2f}M parameters",
            *self._token_lines(sizes),
            f"attention: {self.attention}",
            f"decoder: {d['family']}, {d['layers']} layers, width {d['hidden_size']}, vocabulary "
            f"{d['vocab_size']}; "
            f"{self.params['decoder'] / 1e9:.3f}B parameters",
        ]

    def _token_lines(self, sizes: list[tuple[int, int]] | None) -> list[str]:
        name = "fixed" if self.layout is None else self.layout.name
        if name == "fixed" and sizes is None:
            return [f"tokens per image: {self.tokens_per_image} (image token id {self.image_token_id})"]
        opts = "" if self.layout is None else ", ".join(f"{k}={v}" for k, v in self.layout.options.items())
        head = f"image layout: {name}" + (f" ({opts})" if opts else "")
        table = [
            f"  {h}x{w} px: {n} tokens"
            + ("" if name == "fixed" else f", {self.layout.num_crops((h, w))} crops")
            for (h, w), n in self.image_tokens(sizes).items()
        ]
        return [head, f"tokens per image (image token id {self.image_token_id}):", *table]


SPLIT_FORMATS = (IDEFICS3.name, SMOLVLM.name)


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _parts(
    path: Path, config: dict[str, Any], fmt: str
) -> tuple[VisionConfig, int, ConnectorConfig, str, int, PretrainedConfig]:
    """(tower config, feature layer, connector config, attention, image token id, decoder config)."""
    if fmt == "native":
        config = native.read_config(config, str(path))
        tower = VisionConfig.from_hf(read_json(path / "tower" / "config.json"))
        with no_code_from_files(path / "decoder"):
            text = AutoConfig.from_pretrained(str(path / "decoder"), **NO_CODE_FROM_FILES)
        connector = ConnectorConfig.from_dict(config["connector"])
        return tower, config["feature_layer"], connector, config["attention"], config["image_token_id"], text
    with no_code_from_files(path):
        hf = AutoConfig.from_pretrained(str(path), **NO_CODE_FROM_FILES)
    text = hf.get_text_config()
    if fmt in SPLIT_FORMATS:  # the tower's defaults are Idefics3VisionConfig's; a bias-free projection
        tower = VisionConfig.from_hf(idefics3_vision_config(config.get("vision_config") or {}))
        options = {
            "factor": int(hf.scale_factor),
            "depth": 1,
            "act": "gelu",
            "hidden_dim": None,
            "bias": False,
        }
        connector = ConnectorConfig("pixel_shuffle", tower.hidden_size, text.hidden_size, options)
        return tower, -1, connector, "causal", int(hf.image_token_id), text
    tower = VisionConfig.from_hf(vision_config_fields(hf.vision_config, str(path)))
    if fmt == "paligemma":
        connector = ConnectorConfig("linear", tower.hidden_size, hf.projection_dim, {"bias": True})
        return tower, -1, connector, "prefix", int(hf.image_token_id), text
    layer = hf.vision_feature_layer
    layer = tower.num_hidden_layers if layer == -1 else layer
    bias = bool(getattr(hf, "multimodal_projector_bias", True))
    if hf.projector_hidden_act == "linear":  # what format='llava' writes for a linear connector
        connector = ConnectorConfig("linear", tower.hidden_size, text.hidden_size, {"bias": bias})
    else:
        options = {"depth": 2, "act": hf.projector_hidden_act, "hidden_dim": None, "bias": bias}
        connector = ConnectorConfig("mlp", tower.hidden_size, text.hidden_size, options)
    return tower, layer, connector, "causal", int(hf.image_token_id), text


def _layout(folder: Path, config: dict[str, Any], fmt: str) -> LayoutConfig:
    """The image layout a checkpoint of ``fmt`` holds (from its configs)."""
    if fmt == "native":
        return LayoutConfig.from_dict(config.get("image_layout", {}))
    reader = FORMATS[fmt]
    if not hasattr(reader, "options"):  # one squashed image per placeholder block: paligemma, llava
        return LayoutConfig()
    with no_code_from_files(folder):
        hf = AutoConfig.from_pretrained(str(folder), **NO_CODE_FROM_FILES)
    return LayoutConfig(reader.layout, reader.options(hf, str(folder)))


def describe_vlm(src: str | os.PathLike) -> VLMDescription | None:
    """The description of a VLM checkpoint (folder or hub id), or None if ``src`` is no VLM checkpoint
    (a tower, a ``preset:``): only config files are read."""
    if preset_name(str(src)) is not None:
        return None
    path = resolve(src, allow_patterns=["*.json"])
    folder = path if path.is_dir() else path.parent
    if not (folder / "config.json").exists():
        return None
    config = read_json(folder / "config.json")
    try:
        fmt = checkpoint_format(config, str(src))
    except ValueError:
        return None
    tower_cfg, layer, conn_cfg, attention, image_token_id, text = _parts(folder, config, fmt)
    with torch.device("meta"):
        tower = VisionTower(
            VisionConfig.from_dict({**tower_cfg.to_dict(), "use_head": False}), feature_layer=layer
        )
        connector = conn_cfg.build()
        decoder = AutoModelForCausalLM.from_config(text)
    side = tower_cfg.image_size // tower_cfg.patch_size
    layout = _layout(folder, config, fmt)
    size = tower_cfg.image_size
    return VLMDescription(
        source=str(src),
        format=fmt,
        tower=tower_cfg.to_dict(),
        feature_layer=layer,
        connector=conn_cfg.to_dict(),
        tokens_per_image=connector.num_tokens((side, side)),
        attention=attention,
        image_token_id=image_token_id,
        decoder={
            "family": text.model_type,
            "layers": text.num_hidden_layers,
            "hidden_size": text.hidden_size,
            "vocab_size": text.vocab_size,
        },
        params={"tower": _count(tower), "connector": _count(connector), "decoder": _count(decoder)},
        tower_swap=read_swap(folder),
        layout=layout.build(CropShape.of(connector, (size, size), (side, side))),
    )
