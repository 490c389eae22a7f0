"""The record of a tower swap: which tower replaced which in a VLM, what the connector became and how many
tokens an image takes before and after. ``VisionLanguageModel.replace_tower`` makes it, every checkpoint
format writes it beside the weights (``tower_swap.json``, which transformers ignores) and reads it back,
and ``vision-tower info`` reports it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vision_tower import VisionTower
from vision_tower.checkpoint import read_json

from .base import Connector
from .parts import tower_grid

SWAP_FILE = "tower_swap.json"
_FACTS = ("hidden_size", "patch_size", "image_size")


def tower_facts(tower: VisionTower, connector: Connector) -> dict[str, Any]:
    """What a swap changes: the tower's width, patch and image size, the layer read, the connector and the
    image tokens one image takes in the prompt."""
    return {
        **{k: int(getattr(tower.config, k)) for k in _FACTS},
        "feature_layer": int(tower.feature_layer),
        "connector": connector.config.to_dict(),
        "tokens_per_image": int(connector.num_tokens(tower_grid(tower))),
    }


def swap_record(
    before: dict[str, Any],
    after: dict[str, Any],
    *,
    source: str | None,
    replaced_source: str | None,
    checkpoint: str | None,
    connector: str,
) -> dict[str, Any]:
    """``tower``: the new tower's source as given; ``replaced``: the old tower's facts, its own source
    (when an earlier swap recorded one) and the checkpoint it came in; ``now``: the new facts;
    ``connector``: "fresh" or "kept"."""
    return {
        "tower": source,
        "replaced": {"tower": replaced_source, "checkpoint": checkpoint, **before},
        "now": after,
        "connector": connector,
    }


def write_swap(record: dict[str, Any] | None, folder: Path) -> None:
    if record is not None:
        (folder / SWAP_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def read_swap(folder: Path) -> dict[str, Any] | None:
    """The swap record saved in ``folder``, or None."""
    file = folder / SWAP_FILE
    if not file.exists():
        return None
    record = read_json(file)
    if not isinstance(record, dict) or not {"tower", "replaced", "now", "connector"} <= record.keys():
        raise ValueError(f"{file} is not a tower swap record (keys tower, replaced, now, connector)")
    return record


def _facts_line(f: dict[str, Any]) -> str:
    c = f["connector"]
    return (
        f"width {f['hidden_size']}, patch {f['patch_size']}, {f['image_size']} px, feature layer "
        f"{f['feature_layer']}, connector {c['name']} {c['in_dim']} -> {c['out_dim']}, "
        f"{f['tokens_per_image']} tokens per image"
    )


def swap_lines(record: dict[str, Any]) -> list[str]:
    """The report of a swap record (``vision-tower info``)."""
    old, new = record["replaced"], record["now"]
    where = old.get("tower") or (f"the tower of {old['checkpoint']}" if old.get("checkpoint") else "unknown")
    source = record["tower"] or "given as a model"
    return [
        f"tower source: {source} (swapped in; connector {record['connector']})",
        f"  replaced: {where}: {_facts_line(old)}",
        f"  now: {_facts_line(new)}",
        f"  tokens per image: {old['tokens_per_image']} before the swap, {new['tokens_per_image']} after",
    ]
