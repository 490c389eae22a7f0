"""The header of a safetensors file, parsed and checked before any tensor of it is read.

A safetensors file is an 8-byte little-endian header length, a JSON header (per tensor: ``dtype``,
``shape``, ``data_offsets`` into the data that follows) and the tensor data. A truncated file, a header that
is not JSON, or offsets that do not tile the data exactly are refused here in one line naming the file;
:func:`check_tensors` then compares the entries with what a model expects (floating-point dtypes where it
has floating-point weights, its shapes) before a loader reads the data into it. Without this a header that
declares F32 data as I32 loads as integers that a float parameter silently takes."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import CheckpointError

# bytes per element of each safetensors dtype
ITEM_SIZE = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
    "C64": 8,
}
FLOAT_DTYPES = frozenset({"F8_E4M3", "F8_E5M2", "F8_E8M0", "F16", "BF16", "F32", "F64"})
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as the header describes it."""

    dtype: str
    shape: tuple[int, ...]

    @property
    def floating(self) -> bool:
        return self.dtype in FLOAT_DTYPES


def _refuse(path: Path, why: str) -> ValueError:

    return CheckpointError(f"{path}: not a readable safetensors file: {why}")


def _ints(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in value)


def _entry(path: Path, name: str, info: object) -> tuple[TensorEntry, int, int]:
    """(entry, begin, end) of one header item, each field checked."""
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise _refuse(
            path, f"header entry of tensor {name!r} is not {{dtype, shape, data_offsets}}: {info!r}"
        )
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if dtype not in ITEM_SIZE:
        raise _refuse(path, f"tensor {name!r} has unknown dtype {dtype!r}; known: {sorted(ITEM_SIZE)}")
    if not _ints(shape) or any(d < 0 for d in shape):
        raise _refuse(path, f"tensor {name!r} has shape {shape!r}, not a list of sizes")
    if not _ints(offsets) or len(offsets) != 2 or not 0 <= offsets[0] <= offsets[1]:
        raise _refuse(path, f"tensor {name!r} has data_offsets {offsets!r}, not [begin, end]")
    begin, end = offsets
    needed = math.prod(shape) * ITEM_SIZE[dtype]
    if end - begin != needed:
        raise _refuse(
            path,
            f"tensor {name!r} is {dtype} of shape {tuple(shape)} ({needed} bytes) but its data_offsets "
            f"span {end - begin} bytes: the header does not match the data",
        )
    return TensorEntry(dtype, tuple(shape)), begin, end


def read_header(path: str | os.PathLike) -> dict[str, TensorEntry]:
    """The tensors a safetensors file holds, after checking that its header parses and that the tensors'
    byte ranges tile the data exactly (nothing missing: a truncated file is refused, naming it)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _refuse(
                path, f"the file has {size} bytes, fewer than the 8 of the header length (truncated)"
            )
        length = int.from_bytes(head, "little")
        if length > min(size - 8, MAX_HEADER_BYTES):
            raise _refuse(
                path, f"the header length says {length} bytes, the file has {size - 8} after it (truncated)"
            )
        raw = f.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _refuse(path, f"the header is not JSON ({err})") from None
    if not isinstance(header, dict):
        raise _refuse(path, f"the header is a JSON {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _refuse(path, "__metadata__ is not a map of strings")
    entries, spans = {}, []
    for name, info in header.items():
        entries[name], begin, end = _entry(path, name, info)
        spans.append((begin, end, name))
    data, position = size - 8 - length, 0
    for begin, end, name in sorted(spans):
        if begin != position:
            raise _refuse(path, f"tensor {name!r} starts at byte {begin} of the data, expected {position}")
        position = end
    if position != data:
        why = "truncated" if data < position else "bytes left over"
        raise _refuse(
            path, f"the header describes {position} bytes of tensor data, the file holds {data} ({why})"
        )
    return entries


def check_tensors(
    file: str | os.PathLike,
    entries: dict[str, TensorEntry],
    expected: dict[str, tuple[tuple[int, ...], bool]],
    *,
    model: str,
) -> None:
    """Refuse, in one line naming ``file``, tensors whose stored dtype is not floating point where
    ``model`` has a floating-point weight, or whose shape is not the model's. ``expected``: name ->
    (shape, floating) of the model's tensors, under the names of ``entries``; names it lacks are left to the
    loader's own report of unexpected keys."""
    dtypes, shapes = [], []
    for name, entry in entries.items():
        if name not in expected:
            continue
        shape, floating = expected[name]
        if floating and not entry.floating:
            dtypes.append(f"{name} is {entry.dtype}")
        elif entry.shape != tuple(shape):
            shapes.append(f"{name}: {model} expects {tuple(shape)}, the file has {entry.shape}")
    problems = []
    if dtypes:
        problems.append(
            f"{len(dtypes)} tensor(s) of a non-floating-point dtype where {model} has floating-point weights "
            f"({'; '.join(dtypes[:10])}): a damaged or hand-edited header"
        )
    if shapes:
        problems.append(
            f"{len(shapes)} tensor(s) of the wrong shape ({'; '.join(shapes[:10])}): the weights do not fit "
            "the config beside them"
        )
    if problems:
        raise CheckpointError(f"{file}: " + "; ".join(problems))
