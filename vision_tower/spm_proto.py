"""Minimal reading and rewriting of sentencepiece ``ModelProto`` bytes (no protobuf dependency).

Used by :mod:`vision_tower.tokenizer` to find added/user-defined pieces and to load models the
way transformers does for ``legacy=False`` (no dummy prefix) and for Gemma-style tokenizers.
"""

from __future__ import annotations

from collections.abc import Iterable


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        value |= (buf[pos] & 0x7F) << shift
        shift, pos = shift + 7, pos + 1
        if not buf[pos - 1] & 0x80:
            return value, pos


def _fields(buf: bytes) -> Iterable[tuple[int, bytes, bytes]]:
    """Protobuf wire fields of ``buf``: ``(field number, raw bytes, payload if length-delimited)``."""
    pos = 0
    while pos < len(buf):
        start = pos
        key, pos = _read_varint(buf, pos)
        wire, payload = key & 7, b""
        if wire == 0:
            pos = _read_varint(buf, pos)[1]
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
        elif wire == 2:
            length, pos = _read_varint(buf, pos)
            payload, pos = buf[pos : pos + length], pos + length
        else:
            raise ValueError(f"unsupported protobuf wire type {wire} in the sentencepiece model")
        yield key >> 3, buf[start:pos], payload


def non_normal_pieces(proto: bytes) -> list[tuple[int, str]]:
    """``(id, piece)`` of the unknown, control and user-defined pieces of a ``ModelProto``."""
    out = []
    pieces = (payload for number, _, payload in _fields(proto) if number == 1)  # ModelProto.pieces
    for index, payload in enumerate(pieces):
        if b"\x18" not in payload:  # no type field: NORMAL (fast path)
            continue
        fields = {field: (raw, text) for field, raw, text in _fields(payload)}
        if 3 in fields and _read_varint(fields[3][0], 1)[0] in (2, 3, 4):
            out.append((index, fields[1][1].decode("utf-8")))
    return out


def user_defined_as_normal(proto: bytes) -> bytes:
    """``ModelProto`` whose USER_DEFINED pieces become NORMAL, so only BPE merges can produce them."""
    out = bytearray()
    for number, raw, payload in _fields(proto):
        if number != 1 or b"\x18\x04" not in payload:
            out += raw
            continue
        fields = [r for n, r, _ in _fields(payload) if n != 3]
        kinds = [r for n, r, _ in _fields(payload) if n == 3]
        piece = b"".join(fields) + (b"\x18\x01" if kinds == [b"\x18\x04"] else b"".join(kinds))
        out += b"\x0a" + _varint(len(piece)) + piece
    return bytes(out)


def without_dummy_prefix(proto: bytes) -> bytes:
    """Sentencepiece ``ModelProto`` with ``normalizer_spec.add_dummy_prefix = false`` (no protobuf needed)."""
    out = bytearray()
    for number, raw, payload in _fields(proto):
        if number != 3:  # ModelProto.normalizer_spec
            out += raw
            continue
        spec = b"".join(r for n, r, _ in _fields(payload) if n != 3) + b"\x18\x00"  # add_dummy_prefix = 0
        out += b"\x1a" + _varint(len(spec)) + spec
    return bytes(out)
