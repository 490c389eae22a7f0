"""What each checkpoint format can hold, found by asking the formats themselves: every registered connector
(default options) under every registered image layout, with every supported decoder family, attention and
tower output (the final post-layernorm output, or a block's), goes through each format's ``check``, the
refusals its writer makes before saving. README.md's export table is :func:`export_table` (a test compares
them), so the table cannot drift from the rules.

The probes are built on the meta device (nothing is allocated): a tiny tower, one small decoder per family
(each family's own defaults otherwise, Gemma 2's final-logit soft-capping included), each connector between
their widths, each layout for a crop of that tower."""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from vision_tower import VisionTower
from vision_tower.presets import get_preset

from ..decoder import FAMILIES
from ..inputs import ATTENTION
from ..layouts import CropShape, build_layout, list_layouts
from ..parts import VLMParts
from ..registry import build_connector, list_connectors
from . import FORMATS, FormatError, check

# tower outputs a VLM can read, by the feature layer that stands for each
OUTPUTS = {-1: "final", -2: "block"}
_WIDTH = 64  # the probes' tower and decoder width
_DECODER_SIZE = {
    "hidden_size": _WIDTH,
    "intermediate_size": 128,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 64,
}
Probe = tuple[str, str, int]  # (decoder family, attention, feature layer)


@dataclass(frozen=True)
class Holding:
    """What a format holds of a connector under an image layout: the decoder families, attentions and tower
    outputs (names of :data:`OUTPUTS`) it takes, every combination of them."""

    decoders: tuple[str, ...]
    attention: tuple[str, ...]
    outputs: tuple[str, ...]


@dataclass(frozen=True)
class Row:
    """One row of the table: ``connectors`` under ``layouts`` are held by ``formats`` (their transformers
    classes ``classes``) with ``holding``; no formats: only the universal ones hold them."""

    connectors: tuple[str, ...]
    layouts: tuple[str, ...]
    formats: tuple[str, ...]
    classes: tuple[str, ...]
    holding: Holding | None


def _holding(passed: set[Probe], where: str) -> Holding | None:
    """The probes that passed as a product of decoders x attentions x outputs (None: none passed); a set that
    is no product cannot be written as one row."""
    if not passed:
        return None
    decoders, attention, layers = (sorted({p[i] for p in passed}, key=str) for i in range(3))
    if set(itertools.product(decoders, attention, layers)) != passed:
        raise ValueError(f"{where}: the probes a format takes are no product of decoders, attention, outputs")
    return Holding(
        tuple(sorted(decoders, key=FAMILIES.index)),
        tuple(sorted(attention, key=ATTENTION.index)),
        tuple(OUTPUTS[k] for k in sorted(layers, reverse=True)),
    )


def _decoders() -> dict[str, Any]:
    """A small decoder of each supported family on the meta device."""
    out = {}
    for family in FAMILIES:
        with torch.device("meta"):
            out[family] = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **_DECODER_SIZE))
    return out


def holdings() -> tuple[dict[tuple[str, str, str], Holding | None], list[str], list[str]]:
    """``{(connector, layout, format): Holding or None}`` over every registered connector and layout (aliases
    included) and every format, and the connector and layout names in order."""
    config = get_preset("tiny").vision
    with torch.device("meta"):
        towers = {k: VisionTower(config, feature_layer=k) for k in OUTPUTS}
        connectors = {name: build_connector(name, _WIDTH, _WIDTH) for name in list_connectors()}
    decoders = _decoders()
    crop = CropShape((config.image_size, config.image_size), 4, (2, 2))  # any crop: formats read the name
    out = {}
    for c_name, connector in connectors.items():
        for l_name in list_layouts():
            layout = build_layout(l_name, crop)  # the built layout, as a VisionLanguageModel holds it
            for fmt in FORMATS:
                passed = set()
                for family, attention, layer in itertools.product(FAMILIES, ATTENTION, OUTPUTS):
                    probe = VLMParts(towers[layer], connector, decoders[family], 0, attention)
                    probe.layout = layout
                    try:
                        check(probe, fmt)  # what save(format=fmt) runs first
                    except FormatError:
                        continue
                    passed.add((family, attention, layer))
                out[c_name, l_name, fmt] = _holding(passed, f"{fmt} with {c_name} under {l_name}")
    return out, list(connectors), list_layouts()


def _groups(names: Iterable[str], key) -> list[tuple[str, ...]]:
    """``names`` grouped by ``key(name)``, groups in the order of their first name."""
    groups: dict[Any, list[str]] = {}
    for name in names:
        groups.setdefault(key(name), []).append(name)
    return [tuple(g) for g in groups.values()]


def export_rows() -> tuple[list[Row], list[str]]:
    """The table's rows and the formats that hold every probe (``native``). Connectors whose rows would be
    the same share them, and so do a connector's layouts held alike; formats holding a (connector, layout)
    alike share a row. Rows follow the order of :data:`FORMATS` (the first format that holds them), those
    that only the universal formats hold last."""
    held, connectors, layouts = holdings()
    full = Holding(FAMILIES, ATTENTION, tuple(OUTPUTS.values()))
    universal = [f for f in FORMATS if all(held[c, lay, f] == full for c in connectors for lay in layouts)]
    order = [f for f in FORMATS if f not in universal]

    def found(connector: str, layouts: Iterable[str]) -> tuple:
        """The other formats holding ``connector`` under each of ``layouts``, and what they hold."""
        return tuple(
            tuple((f, held[connector, lay, f]) for f in order if held[connector, lay, f] is not None)
            for lay in layouts
        )

    def first(connector: str, layouts: Iterable[str]) -> int:
        """The place in :data:`FORMATS` of the first format holding ``connector`` under ``layouts``."""
        places = [order.index(f) for each in found(connector, layouts) for f, _ in each]
        return min(places, default=len(order))

    rows = []
    by_connector = _groups(connectors, lambda c: found(c, layouts))
    for group in sorted(by_connector, key=lambda g: first(g[0], layouts)):
        c = group[0]
        by_layout = _groups(layouts, lambda lay, c=c: found(c, [lay]))
        for same in sorted(by_layout, key=lambda s, c=c: first(c, s)):
            (holders,) = found(c, same[:1])
            if not holders:
                rows.append(Row(group, same, (), (), None))
            for fmts in _groups([f for f, _ in holders], lambda f, c=c, lay=same[0]: held[c, lay, f]):
                classes = tuple(str(FORMATS[f].architecture) for f in fmts)
                rows.append(Row(group, same, fmts, classes, held[c, same[0], fmts[0]]))
    return rows, universal


def _names(values: Iterable[str]) -> str:
    return ", ".join(f"`{v}`" for v in values)


def _any(values: tuple[str, ...], every: tuple[str, ...]) -> str:
    return "any" if values == every else _names(values)


def export_table() -> str:
    """README.md's export table (Markdown): per connector and image layout, the formats transformers loads
    that hold it, their classes, and the decoders, attention and tower output they take."""
    rows, universal = export_rows()
    every_output = tuple(OUTPUTS.values())
    lines = [
        "| connector | image layout | format | transformers class | decoder | attention | tower output |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.holding is None:
            cells = [f"only {_names(universal)}", "—", "any", "any", "any"]
        else:
            h = r.holding
            cells = [
                _names(r.formats),
                _names(r.classes),
                _any(h.decoders, FAMILIES),
                _any(h.attention, ATTENTION),
                "any" if h.outputs == every_output else ", ".join(h.outputs),
            ]
        lines.append("| " + " | ".join([_names(r.connectors), _names(r.layouts), *cells]) + " |")
    return "\n".join(lines) + "\n"
