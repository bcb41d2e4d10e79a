"""PostgreSQL's binary COPY format, both ways. Its output, parsed: bytea columns come as raw bytes (a plain SELECT
sends them hex-encoded, twice the size, decoded byte by byte), a few fields a row, read with ``struct``; and rows
encoded as its input (what ``COPY ... FROM STDIN`` takes: bytea as it is, where an INSERT's text escapes every
byte).

Field types are named by one letter: ``t`` text (UTF-8), ``i`` int4, ``q`` int8, ``b`` bytea (``bytes`` of its own: a
view of the stream would keep all of it alive as long as any one value is, e.g. in a cache).
"""

from __future__ import annotations

import struct
from typing import Any

_SIGNATURE = b"PGCOPY\n\xff\r\n\x00"
_HEADER_LEN = len(_SIGNATURE) + 8  # flags, header extension length
_INT2 = struct.Struct("!h")
_INT4 = struct.Struct("!i")
_INT8 = struct.Struct("!q")


class CopyFormatError(ValueError):
    """The bytes are not binary COPY of the expected fields."""


def decode(data: memoryview, fields: str) -> list[tuple[Any, ...]]:
    """The rows of a binary COPY stream whose columns are of the types ``fields`` names (NULL: None)."""
    if bytes(data[: len(_SIGNATURE)]) != _SIGNATURE:
        raise CopyFormatError("not PostgreSQL binary COPY output")
    (extension,) = _INT4.unpack_from(data, len(_SIGNATURE) + 4)
    pos = _HEADER_LEN + extension
    rows: list[tuple[Any, ...]] = []
    while True:
        (count,) = _INT2.unpack_from(data, pos)
        pos += 2
        if count == -1:
            return rows
        if count != len(fields):
            raise CopyFormatError(f"a row of {count} fields, expected {len(fields)}")
        row: list[Any] = []
        for kind in fields:
            (length,) = _INT4.unpack_from(data, pos)
            pos += 4
            if length == -1:
                row.append(None)
                continue
            if kind == "b":
                row.append(bytes(data[pos : pos + length]))
            elif kind == "t":
                row.append(str(data[pos : pos + length], "utf-8"))
            elif kind == "i":
                row.append(_INT4.unpack_from(data, pos)[0])
            elif kind == "q":
                row.append(_INT8.unpack_from(data, pos)[0])
            else:
                raise ValueError(f"unknown field type {kind!r}")
            pos += length
        rows.append(tuple(row))


def encode(rows: list[tuple[Any, ...]], fields: str) -> bytes:
    """Binary COPY input of ``rows``, each of the types ``fields`` names (None: NULL)."""
    parts = [_SIGNATURE, b"\x00\x00\x00\x00\x00\x00\x00\x00"]
    count = _INT2.pack(len(fields))
    null = _INT4.pack(-1)
    for row in rows:
        parts.append(count)
        for kind, value in zip(fields, row, strict=True):
            if value is None:
                parts.append(null)
                continue
            if kind == "b":
                raw = bytes(value) if not isinstance(value, bytes) else value
            elif kind == "t":
                raw = value.encode("utf-8")
            elif kind == "i":
                raw = _INT4.pack(value)
            elif kind == "q":
                raw = _INT8.pack(value)
            else:
                raise ValueError(f"unknown field type {kind!r}")
            parts.append(_INT4.pack(len(raw)))
            parts.append(raw)
    parts.append(_INT2.pack(-1))
    return b"".join(parts)
