"""``cache.json`` of a feature cache (:mod:`.feature_cache`): what it must hold, read and checked before
any feature is: its structure and version, and every file it lists present with the size it records.
Anything wrong is one error naming the file and what is wrong with it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

INDEX = "cache.json"
VERSION = 2  # 2: per-sample image digests in the files' metadata, file sizes in the index
AGAIN = "extract the features again (vision-tower extract --model TOWER --shards SHARDS --out DIR)"
# the image layout of the identity of a cache that names none (written before layouts were recorded)
FIXED_LAYOUT: dict[str, Any] = {"name": "fixed", "options": {}}


def layout_identity(layout: Any) -> dict[str, Any]:
    """An image layout's (:class:`~connectors.layouts.ImageLayout`) name and options, defaults filled in
    (``anyres`` with ``grid_pinpoints`` unset is ``anyres`` with LLaVA-NeXT's), as ``cache.json`` holds
    them (JSON values: tuples as lists), to compare with a model's."""
    identity = {"name": layout.name, "options": layout.resolved_options()}
    return json.loads(json.dumps(identity))


def _index_problem(index: Any) -> str | None:
    """What is wrong with the structure of a cache.json (None: nothing)."""
    if not isinstance(index, dict):
        return f"a JSON {type(index).__name__}, not an object"
    if index.get("version") != VERSION:
        return f"cache version {index.get('version')}, this reader reads version {VERSION}"
    missing = [k for k in ("identity", "shards", "grid", "dim") if k not in index]
    if missing:
        return f"no {', '.join(missing)}"
    if not isinstance(index["identity"], dict) or not isinstance(index["shards"], dict):
        return "identity and shards must be objects"
    grid = index["grid"]
    if not (isinstance(grid, list) and len(grid) == 2 and all(isinstance(g, int) for g in grid)):
        return f"grid must be two integers, got {grid!r}"
    if not isinstance(index["dim"], int):
        return f"dim must be an integer, got {index['dim']!r}"
    for name, entry in index["shards"].items():
        fields = ("files", "skipped")
        if not isinstance(entry, dict) or not all(isinstance(entry.get(f), dict) for f in fields):
            return f"shard {name!r} needs the objects files and skipped"
        for file, size in entry["files"].items():
            if os.path.basename(file) != file or not isinstance(size, int):
                return f"shard {name!r} lists {file!r} (size {size!r}): a file name in the folder and a size"
    return None


def read_index(folder: Path) -> dict[str, Any]:
    """``folder/cache.json``, checked (structure, version) with every file it lists there and of its size;
    anything wrong is one ``ValueError`` (``FileNotFoundError`` without it) naming the file."""
    file = folder / INDEX
    if not file.exists():
        raise FileNotFoundError(
            f"{folder} is not a feature cache (no {INDEX}): make one with "
            f"vision-tower extract --model TOWER --shards SHARDS --out {folder}"
        )
    try:
        index = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{file} is not valid JSON ({err}): {AGAIN}") from None
    problem = _index_problem(index)
    if problem is not None:
        raise ValueError(f"{file} is not a feature cache index this version reads ({problem}): {AGAIN}")
    for entry in index["shards"].values():
        for name, size in entry["files"].items():
            path = folder / name
            if not path.is_file():
                raise ValueError(f"feature cache file {path} is missing ({file} lists it): {AGAIN}")
            if path.stat().st_size != size:
                raise ValueError(
                    f"feature cache file {path} has {path.stat().st_size} bytes, {file} records {size} "
                    f"(truncated or rewritten): {AGAIN}"
                )
    return index
