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
