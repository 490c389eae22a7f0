"""A local Hugging Face hub cache laid out as huggingface_hub writes it, for loading by repo id with
``HF_HUB_OFFLINE=1`` (no test downloads anything)."""

from __future__ import annotations

import shutil
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_cache(root: Path, repo_id: str, files_from: Path, commit: str = COMMIT) -> Path:
    """Put the files of the folder ``files_from`` into the cache ``root`` as ``repo_id`` at ``commit``
    (``models--org--name/snapshots/COMMIT`` and ``refs/main``); returns the snapshot folder."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    shutil.copytree(files_from, snap)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snap
