"""A disk that fills up, inside one process (a test cannot fill a real one):

    python -m tests.helpers.full_disk MATCH BYTES STYLE -- ARGS...

runs ``vision-tower ARGS`` with torch's and safetensors' file writers patched: files whose path contains
MATCH share BYTES bytes of room; the write that passes it leaves what fitted on disk and fails as that
writer fails on a full disk: STYLE ``oserror`` raises ``OSError(ENOSPC)``, STYLE ``native`` what the real
writers raise (torch: ``RuntimeError: [enforce fail at inline_container.cc:672] . unexpected pos``, with no
errno; safetensors: ``SafetensorError`` wrapping "No space left on device"). The room the runner sees left
(``training.runner.writes.free_bytes``) is this disk's. Other files are written as usual.
"""

from __future__ import annotations

import errno
import io
import os
import sys
import tempfile
from pathlib import Path


class FullDisk:
    def __init__(self, match: str, room: int, style: str) -> None:
        self.match, self.room, self.style, self.used = match, room, style, 0

    def left(self) -> int:
        return max(self.room - self.used, 0)

    def write(self, path, data: bytes, writer: str) -> None:
        fits = min(self.left(), len(data))
        with open(path, "wb") as f:
            f.write(data[:fits])
        self.used += fits
        if fits < len(data):
            raise self._error(writer, path, fits)

    def _error(self, writer: str, path, written: int) -> Exception:
        if self.style == "oserror":
            return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        if writer == "torch":
            return RuntimeError(
                f"[enforce fail at inline_container.cc:672] . unexpected pos {written + 64} vs {written}"
            )
        from safetensors import SafetensorError

        return SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    def install(self) -> None:
        import safetensors.torch
        import torch

        import training.runner.writes as writes

        real_save, real_serialize = torch.save, safetensors.torch.serialize_file

        def save(obj, f, *args, **kwargs):
            if not isinstance(f, str | os.PathLike) or self.match not in str(f):
                return real_save(obj, f, *args, **kwargs)
            buf = io.BytesIO()
            real_save(obj, buf, *args, **kwargs)
            self.write(f, buf.getvalue(), "torch")

        def serialize_file(tensors, filename, metadata=None):
            if self.match not in str(filename):
                return real_serialize(tensors, filename, metadata=metadata)
            with tempfile.TemporaryDirectory() as tmp:
                real_serialize(tensors, str(Path(tmp) / "t"), metadata=metadata)
                data = (Path(tmp) / "t").read_bytes()
            self.write(filename, data, "safetensors")

        torch.save = save
        safetensors.torch.serialize_file = serialize_file
        writes.free_bytes = lambda path: self.left()


if __name__ == "__main__":
    match, room, style, dashes, *args = sys.argv[1:]
    assert dashes == "--" and style in ("oserror", "native"), sys.argv
    FullDisk(match, int(room), style).install()
    from vision_tower.cli import main

    sys.exit(main(args))
