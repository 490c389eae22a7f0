"""Writing WebDataset shards and decoding images the way the tests' data pipelines expect."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

from PIL import Image

# One unshuffled pass over the shards on one rank, every sample kept: an order a test can predict.
ONE_PASS = dict(rank=0, world_size=1, resampled=False, shuffle=False, drop_last=False)


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A tar shard at ``path`` (parent folders made) holding ``(member name, bytes)`` in order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def pil_decode(data: bytes) -> Image.Image:
    """Image bytes -> RGB PIL image; a truncated file fails here (``load``), not later."""
    image = Image.open(io.BytesIO(data))
    image.load()
    return image.convert("RGB")


def encode(image: Image.Image, fmt: str) -> bytes:
    """``image`` saved as ``fmt`` (PNG, JPEG, ...) into bytes."""
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()
