"""A shard's request to a sandbox child: one sealed memfd the worker writes and the child maps read-only.

Layout (native byte order; the worker and its children share a host)::

    [8 bytes: header length H][H bytes: header JSON][padding to 8][float64 bars][UTF-8 calendars]

The header holds the script, its params, the limits, the mode, which of the five series the request carries
(``series``: those the script names, in the order of :data:`SERIES`) and one entry per item: its symbol, its bar
count ``n``, where its series start in the bars (``at``, in float64 values, ``n`` each) and which calendar its
dates are. A calendar is one text of ISO dates (or timestamps) joined by newlines,
stored once for every item of the shard that has exactly those dates: the child builds one tuple of strings per
calendar, not one per symbol.

The worker seals the memfd (no write, grow, shrink or further seals) before the child gets it, so what the child
reads is what the worker wrote, and the child's own view of it is read-only. The request is trusted (the worker
wrote it); nothing the child sends back is.
"""

from __future__ import annotations

import fcntl
import json
import mmap
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # the sandbox side never imports the market-data package
    from shared.marketdata.bars import SymbolBars

SERIES = ("open", "high", "low", "close", "volume")
_SEALS = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE


def _aligned(size: int) -> int:
    return (size + 7) // 8 * 8


def series_needed(names: frozenset[str] | None, mode: str | None) -> tuple[str, ...]:
    """The series a request carries: those the script names (all when it does not parse: it gets its compile
    error anyway); a strategy's ``close`` always (its signals are counted against it)."""
    if names is None:
        return SERIES
    return tuple(name for name in SERIES if name in names or (name == "close" and mode == "strategy"))


def write_request(header: dict[str, Any], items: Sequence[SymbolBars], series: Sequence[str] = SERIES) -> int:
    """A sealed memfd holding ``header`` (with the items' entries and calendars added) and the items' ``series``;
    the caller owns the descriptor."""
    calendars: dict[bytes, int] = {}
    texts: list[bytes] = []
    entries: list[dict[str, Any]] = []
    at = 0
    for item in items:
        key = item.ts.tobytes()
        if key not in calendars:
            calendars[key] = len(texts)
            texts.append("\n".join(item.dates).encode())
        n = len(item)
        entries.append({"symbol": item.symbol, "n": n, "at": at, "dates": calendars[key]})
        at += len(series) * n
    encoded = json.dumps({**header, "series": list(series), "items": entries,
                          "calendars": [len(t) for t in texts]}).encode()  # fmt: skip
    bars_at = _aligned(8 + len(encoded))
    size = bars_at + 8 * at + sum(len(t) for t in texts)
    fd = os.memfd_create("alphaforge-sandbox-request", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        with mmap.mmap(fd, size) as view:
            view[:8] = len(encoded).to_bytes(8, "little")
            view[8 : 8 + len(encoded)] = encoded
            bars = np.frombuffer(view, dtype=np.float64, count=at, offset=bars_at)
            for entry, item in zip(entries, items, strict=True):
                start, n = entry["at"], entry["n"]
                for k, name in enumerate(series):
                    bars[start + k * n : start + (k + 1) * n] = getattr(item, name)
            del bars  # the view must go before the mapping closes
            offset = bars_at + 8 * at
            for text in texts:
                view[offset : offset + len(text)] = text
                offset += len(text)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
    except BaseException:
        os.close(fd)
        raise
    return fd


@dataclass(frozen=True)
class Request:
    """The child's read-only view of its request: the header and the mapped bytes after it."""

    header: dict[str, Any]
    view: memoryview  # the whole mapping, read-only
    bars_at: int  # byte offset of the first float64 value
    calendars_at: list[int]  # byte offset of each calendar's text

    def series(self, entry: dict[str, Any], k: int) -> memoryview:
        """The bytes of the item's ``k``-th series (``header["series"][k]``)."""
        n = int(entry["n"])
        start = self.bars_at + 8 * (int(entry["at"]) + k * n)
        return self.view[start : start + 8 * n]

    def calendar(self, index: int) -> tuple[str, ...]:
        start = self.calendars_at[index]
        size = int(self.header["calendars"][index])
        return tuple(str(self.view[start : start + size], "utf-8").split("\n")) if size else ()


def read_request(fd: int) -> Request:
    """Map the request read-only (in the child, before its limits: mapping needs no file access after)."""
    size = os.fstat(fd).st_size
    view = memoryview(mmap.mmap(fd, size, prot=mmap.PROT_READ)) if size else memoryview(b"")
    length = int.from_bytes(view[:8], "little")
    header = json.loads(bytes(view[8 : 8 + length]))
    bars_at = _aligned(8 + length)
    offset = bars_at + 8 * sum(len(header["series"]) * int(e["n"]) for e in header["items"])
    calendars_at = []
    for size_of in header["calendars"]:
        calendars_at.append(offset)
        offset += int(size_of)
    return Request(header, view, bars_at, calendars_at)
