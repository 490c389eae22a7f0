"""Resolve a model source (local folder, local file, or hub repo id) to local files."""

from __future__ import annotations

import os
import re
from pathlib import Path

# Files a tower, processor or tokenizer may need; weights of other formats are never fetched.
DEFAULT_PATTERNS = (
    "*.json",
    "*.safetensors",
    "*.safetensors.index.json",
    "*.model",
    "*.txt",
)

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


def check_local_or_repo_id(src: str | os.PathLike) -> None:
    """``src`` must be an existing local path or be written as a hub repo id (``name`` or
    ``namespace/name``): a missing folder such as ``/runs/x/decoder`` is named as such, before a hub client
    says how repo ids are written."""
    text = str(src)
    if Path(os.path.expanduser(text)).exists():
        return
    if not _REPO_ID.match(text) or text.startswith((".", "/")):
        raise FileNotFoundError(f"{text!r} is neither an existing local path nor a hub repo id")


def resolve(
    src: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    allow_patterns: tuple[str, ...] | list[str] | None = None,
) -> Path:
    """Return a local path for ``src``.

    ``src`` is a local folder or file (returned as is), or a hub repo id such as
    ``google/siglip-so400m-patch14-384`` that is resolved through ``huggingface_hub``
    (honouring ``revision``, ``cache_dir``, ``HF_HOME``/``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE``).
    """
    path = Path(os.path.expanduser(str(src)))
    if path.exists():
        return path
    check_local_or_repo_id(src)
    text = str(src)
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError as err:  # pragma: no cover - huggingface_hub is a dependency
        raise FileNotFoundError(f"{text!r} is not a local path and huggingface_hub is missing") from err
    try:
        local = snapshot_download(
            repo_id=text,
            revision=revision,
            cache_dir=None if cache_dir is None else str(cache_dir),
            allow_patterns=list(allow_patterns or DEFAULT_PATTERNS),
        )
    except LocalEntryNotFoundError as err:
        raise FileNotFoundError(
            f"{text!r} is not a local path, and the hub repo is not in the cache"
            f"{' at revision ' + revision if revision else ''} while offline (HF_HUB_OFFLINE) "
            f"or the hub cannot be reached: {err}"
        ) from err
    except HfHubHTTPError as err:
        raise FileNotFoundError(f"could not resolve hub repo {text!r}: {err}") from err
    return Path(local)
