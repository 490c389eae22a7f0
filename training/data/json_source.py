"""Samples from one JSON Lines file (or JSON array) and an image folder, as LLaVA's data comes: each record
a sample (``{"id", "image", "conversations"}``, ``{"messages", "images"}``, or ``{"image", "prompt",
"answer"}``), its images named relative to the folder.

Nothing but an index sits in memory: the byte offset of each record (8 bytes a sample), built by one pass
over the file. A JSON array is parsed once in each rank's main process when the source is opened and
written out as JSON Lines to a temporary file (removed at exit), read from then on like a JSON Lines file;
for a large set give JSON Lines, which is indexed without parsing. The records are read in pieces of
``piece`` samples, which the stream draws and splits over ranks and workers as it does shards; a raw
sample is ``{"__key__": "<file>:<line>", "__url__", "json": bytes, "__folder__": image folder,
"__folder_key__": the folder's config key}``, and its images are read when it is built, not when it is
passed over. The same source, read piece after piece in order, gives held-out samples in file order
(``data.val_json``, ``eval vlm --json``).
"""

from __future__ import annotations

import atexit
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .shards import IMAGE_EXTENSIONS, SkipCounter, SkipSample, sample_fields

PIECE = 256  # records per piece of the stream


def _is_array(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return head.startswith(b"[")


def _line_offsets(path: str) -> np.ndarray:
    """(n, 2) start and end byte offsets of the non-blank lines."""
    spans, pos = [], 0
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                spans.append((pos, pos + len(line)))
            pos += len(line)
    return np.asarray(spans, dtype=np.int64).reshape(-1, 2)


def _spill(path: str, key: str) -> str:
    """A JSON array written out as JSON Lines in a temporary file (removed at exit); ``key`` names the file
    in errors."""
    with open(path, encoding="utf-8") as f:
        try:
            records = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{key} {path}: not valid JSON ({err})") from None
    if not isinstance(records, list):
        raise ValueError(f"{key} {path}: a JSON file must hold an array of samples")
    fd, out = tempfile.mkstemp(prefix="vision-tower-", suffix=".jsonl")
    atexit.register(lambda: os.path.exists(out) and os.remove(out))
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return out


class JsonSource:
    """The samples of ``path`` (JSON Lines, or a JSON array) with images under ``image_folder``. ``keys``
    are how the user named the file and the folder (``data.val_json``, ``--json`` ...), for errors."""

    def __init__(
        self,
        path: str | os.PathLike,
        image_folder: str | os.PathLike | None,
        piece: int = PIECE,
        keys: tuple[str, str] = ("data.train_json", "data.image_folder"),
    ):
        self.path = os.fspath(path)
        self.keys = keys
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"{keys[0]} {self.path} is not a file")
        self.image_folder = None if image_folder is None else os.fspath(image_folder)
        if self.image_folder is not None and not os.path.isdir(self.image_folder):
            raise FileNotFoundError(f"{keys[1]} {self.image_folder} is not a folder")
        self.file = _spill(self.path, keys[0]) if _is_array(self.path) else self.path
        self.offsets = _line_offsets(self.file)  # (n, 2)
        if not len(self.offsets):
            raise ValueError(f"{keys[0]} {self.path} holds no samples")
        self.piece = piece
        self.urls = [f"{self.file}#{start}" for start in range(0, len(self.offsets), piece)]

    def __len__(self) -> int:
        return len(self.offsets)

    def read(self, url: str, counter: SkipCounter) -> Iterator[dict[str, Any]]:
        """The raw samples of one piece (``url`` is ``<file>#<first record>``)."""
        start = int(url.rsplit("#", 1)[1])
        name = os.path.basename(self.path)
        with open(self.file, "rb") as f:
            for i in range(start, min(start + self.piece, len(self.offsets))):
                lo, hi = self.offsets[i]
                f.seek(int(lo))
                yield {
                    "__key__": f"{name}:{i + 1}",
                    "__url__": self.path,
                    "json": f.read(int(hi - lo)),
                    "__folder__": self.image_folder,
                    "__folder_key__": self.keys[1],
                }


def image_blobs(sample: dict[str, Any], names: list[str]) -> list[bytes]:
    """The bytes of a sample's images: the files ``names`` under its ``__folder__`` (a JSON source), or the
    shard's image members (``jpg``, or ``0.jpg``, ``1.jpg``... for several, in that order)."""
    folder = sample.get("__folder__", False)
    if folder is not False:
        key = sample.get("__folder_key__", "data.image_folder")
        if names and folder is None:
            raise ValueError(f"the samples name image files: set {key} (the folder they are in)")
        blobs = []
        for name in names:
            path = Path(folder, name)
            if not path.resolve().is_relative_to(Path(folder).resolve()):
                raise SkipSample("missing_image", f"{name!r} is outside {key}")
            try:
                blobs.append(path.read_bytes())
            except OSError as err:
                raise SkipSample("missing_image", f"{path}: {err.strerror or err}") from err
        return blobs
    members = [k for k in sample if not k.startswith("__") and k.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS]
    members.sort(key=lambda k: (int(k.split(".")[0]) if k.split(".")[0].isdigit() else -1, k))
    if names and len(members) != len(names):
        raise SkipSample(
            "missing_image", f"json names {len(names)} image(s), the shard has {sample_fields(sample)}"
        )
    return [sample[k] for k in members]
