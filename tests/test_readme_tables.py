"""README tables that the code computes: recomputed here, so that they cannot drift from the code."""

from __future__ import annotations

import re

from connectors import build_connector
from connectors.layouts import CropShape, build_layout
from training.runner.paths import ROOT

# the token table of "High resolution": so400m/14 at 384 px (27x27 patches, width 1152), decoder width 896
CONNECTORS = {"mlp2x_gelu": {}, "pixel_shuffle": {"factor": 3}, "avg_pool": {"tokens_per_side": 9}}


def _table(marker: str) -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    block = re.search(rf"<!-- {marker} -->\n(.*?)<!-- /{marker} -->", text, re.S)
    assert block, f"README.md has no <!-- {marker} --> table"
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in block.group(1).splitlines()]
    return [r for r in rows if not set("".join(r)) <= set("-")]


def test_high_resolution_token_table_is_what_the_layouts_give():
    header, *rows = _table("tokens-table")
    sizes = [tuple(int(v) for v in cell.split("x")) for cell in header[2:]]
    assert len(rows) == 5 and len(sizes) == 5
    for layout, connector, *cells in rows:
        name = connector.split("`")[1]
        shape = CropShape.of(build_connector(name, 1152, 896, **CONNECTORS[name]), (384, 384), (27, 27))
        built = build_layout(layout.strip("`"), shape)
        assert connector == f"`{name}` ({shape.tokens}/crop)"
        assert cells == [f"{built.num_tokens(s)} ({built.num_crops(s)})" for s in sizes], layout


def _names(cell: str) -> list[str]:
    return [name.strip().strip("`") for name in cell.split(",")]


def test_export_formats_table_is_what_the_formats_checks_give():
    """README's export table equals the one computed from the formats' own checks, covers every registered
    connector under every registered layout, and says what the format tests show."""
    from connectors import list_connectors, list_layouts
    from connectors.formats.capacity import export_table

    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- formats-table -->\n(.*?)<!-- /formats-table -->", text, re.S)
    assert block, "README.md has no <!-- formats-table --> table"
    assert block.group(1) == export_table(), "README's export table differs: paste export_table()'s output"

    header, *rows = _table("formats-table")
    assert header[:4] == ["connector", "image layout", "format", "transformers class"]
    covered = [(c, lay) for row in rows for c in _names(row[0]) for lay in _names(row[1])]
    assert sorted(set(covered)) == sorted((c, lay) for c in list_connectors() for lay in list_layouts())
    held = {
        (c, lay, f): row
        for row in rows
        for c in _names(row[0])
        for lay in _names(row[1])
        for f in _names(row[2])
    }
    assert held["pixel_shuffle", "split", "smolvlm"][3:] == [
        "`Idefics3ForConditionalGeneration`, `SmolVLMForConditionalGeneration`",
        "`llama`",
        "`causal`",
        "final",
    ]
    assert held["linear", "fixed", "paligemma"][4:] == ["`gemma`, `gemma2`", "`prefix`", "final"]
    assert held["avg_pool", "pan_and_scan", "gemma3"][4:] == [
        "`gemma3_text`",
        "`image_bidirectional`",
        "final",
    ]
    assert "`gemma2`" not in held["mlp2x_gelu", "anyres_max_9", "llava_onevision"][4]  # soft-capping
    (resampler,) = [r for r in rows if "resampler" in _names(r[0]) and "split" in _names(r[1])]
    assert resampler[2:] == ["only `native`", "—", "any", "any", "any"]
