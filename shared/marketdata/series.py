"""Bars as columns: one symbol's history at one timeframe is six contiguous arrays, stored in chunks.

Pure code (no database): the column layout of a stored chunk, which chunk a bar belongs to, and how an import
merges into what is stored. :mod:`shared.marketdata.store` moves these bytes in and out of PostgreSQL.

A chunk's ``data`` is ``ts`` (int64, seconds since the Unix epoch, UTC) followed by ``open``, ``high``, ``low``,
``close`` and ``volume`` (float64), each ``n`` values, little-endian: 48 bytes a bar, read back with
``numpy.frombuffer`` and no parsing. A daily bar's ``ts`` is its date at 00:00 UTC.
"""

from __future__ import annotations

import datetime as dt
import itertools
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

# What a symbol may look like everywhere (API requests, CSV imports): upper-case letters, digits and
# . - ^ = _ (e.g. BRK.B, BF-B), starting with a letter or digit, at most 32 characters.
SYMBOL_PATTERN = re.compile(r"[A-Z0-9][A-Z0-9.\-^=_]{0,31}")

COLUMNS: tuple[str, ...] = ("open", "high", "low", "close", "volume")
BYTES_PER_BAR = 8 * (1 + len(COLUMNS))
_I8 = np.dtype("<i8")
_F8 = np.dtype("<f8")
SECONDS_PER_DAY = 86_400

# Stored timeframes, finest first, with their length in seconds.
TIMEFRAME_SECONDS: dict[str, int] = {"1m": 60, "5m": 300, "15m": 900, "30m": 1800, "1h": 3600, "1d": SECONDS_PER_DAY}
DEFAULT_TIMEFRAME = "1d"


@dataclass(frozen=True)
class Columns:
    """Aligned bar columns, oldest first: ``ts`` strictly increasing epoch seconds, the rest float64."""

    ts: NDArray[np.int64]
    open: NDArray[np.float64]
    high: NDArray[np.float64]
    low: NDArray[np.float64]
    close: NDArray[np.float64]
    volume: NDArray[np.float64]

    def __len__(self) -> int:
        return len(self.ts)

    def values(self) -> NDArray[np.float64]:
        """The five value columns as one (5, n) array."""
        return np.stack([self.open, self.high, self.low, self.close, self.volume])

    @classmethod
    def from_values(cls, ts: NDArray[np.int64], values: NDArray[np.float64]) -> Columns:
        return cls(ts, values[0], values[1], values[2], values[3], values[4])

    def take(self, lo: int, hi: int) -> Columns:
        return Columns(*(column[lo:hi] for column in self._arrays()))

    def _arrays(self) -> tuple[NDArray[Any], ...]:
        return (self.ts, self.open, self.high, self.low, self.close, self.volume)

    def between(self, start_ts: int | None, end_ts: int | None) -> Columns:
        """The bars with ``start_ts <= ts <= end_ts`` (either bound optional), as views."""
        lo = 0 if start_ts is None else int(np.searchsorted(self.ts, start_ts, side="left"))
        hi = len(self) if end_ts is None else int(np.searchsorted(self.ts, end_ts, side="right"))
        return self if (lo, hi) == (0, len(self)) else self.take(lo, max(lo, hi))


def pack(columns: Columns) -> bytes:
    """The stored bytes of a chunk (see the module's docstring)."""
    values = (getattr(columns, name).astype(_F8, copy=False).tobytes() for name in COLUMNS)
    return b"".join([columns.ts.astype(_I8, copy=False).tobytes(), *values])


def unpack(data: bytes | memoryview, n: int) -> Columns:
    """A stored chunk's columns: read-only views of ``data``, no copy."""
    if len(data) != n * BYTES_PER_BAR:
        raise ValueError(f"a chunk of {n} bars holds {len(data)} bytes, not {n * BYTES_PER_BAR}")
    ts = np.frombuffer(data, dtype=_I8, count=n)
    values = np.frombuffer(data, dtype=_F8, offset=8 * n).reshape(len(COLUMNS), n)
    return Columns.from_values(ts, values)


def concat(parts: list[Columns]) -> Columns:
    """Consecutive chunks of one series as one (no copy when there is one part)."""
    if len(parts) == 1:
        return parts[0]
    if not parts:
        return Columns(np.empty(0, _I8), *(np.empty(0, _F8) for _ in COLUMNS))
    return Columns(*(np.concatenate(arrays) for arrays in zip(*(p._arrays() for p in parts), strict=True)))


def chunk_start(timeframe: str, ts: NDArray[np.int64]) -> NDArray[np.int64]:
    """The chunk (its first day, as epoch days) of each bar: a decade of daily bars (2,520 bars, 121 KB), a year of
    hourly ones, a month of finer ones (about 8,000 one-minute bars of a regular session, 390 KB). Chunks bound what
    one import rewrites and what one read fetches beyond the range it asked for."""
    days = (ts // SECONDS_PER_DAY).astype("datetime64[D]")
    if timeframe == "1d":
        years = days.astype("datetime64[Y]").astype(np.int64) + 1970
        first = ((years // 10) * 10 - 1970).astype("datetime64[Y]")
    elif timeframe == "1h":
        first = days.astype("datetime64[Y]")
    else:
        first = days.astype("datetime64[M]")
    return first.astype("datetime64[D]").astype(np.int64)


def split_chunks(timeframe: str, columns: Columns) -> Iterator[tuple[int, Columns]]:
    """``columns`` cut at chunk boundaries: (chunk's first day as epoch days, its bars), in order."""
    if not len(columns):
        return
    keys = chunk_start(timeframe, columns.ts)
    edges = np.flatnonzero(keys[1:] != keys[:-1]) + 1
    bounds = [0, *edges.tolist(), len(columns)]
    for lo, hi in itertools.pairwise(bounds):
        yield int(keys[lo]), columns.take(lo, hi)


_EPOCH = dt.date(1970, 1, 1)


def by_symbol(
    symbols: Sequence[str], codes: NDArray[np.int64], ts: NDArray[np.int64], values: NDArray[np.float64]
) -> dict[str, Columns]:
    """Rows (each row's symbol as an index into ``symbols``, its ``ts``, its five values as a column of ``values``)
    as each symbol's columns in time order. Rows must not repeat a (symbol, ts)."""
    order = np.lexsort((ts, codes))
    by_code, by_ts = codes[order], ts[order]
    edges = [0, *(np.flatnonzero(by_code[1:] != by_code[:-1]) + 1).tolist(), len(order)]
    return {
        symbols[int(by_code[lo])]: Columns.from_values(by_ts[lo:hi], values[:, order[lo:hi]])
        for lo, hi in itertools.pairwise(edges)
        if hi > lo
    }


def day_ts(day: dt.date) -> int:
    """A date as the ``ts`` of its daily bar."""
    return (day - _EPOCH).days * SECONDS_PER_DAY


@dataclass(frozen=True)
class Merge:
    """What an import does to a stored series: the merged columns and how many bars it added or changed."""

    columns: Columns
    inserted: int
    updated: int


def merge(stored: Columns, incoming: Columns) -> Merge:
    """``incoming`` laid over ``stored`` by ``ts``: a bar at a new ``ts`` is added, one at a stored ``ts`` replaces it
    (counted as updated only if a value differs, bit for bit). ``incoming`` must be sorted with no repeated ``ts``."""
    if not len(stored):
        return Merge(incoming, len(incoming), 0)
    position = np.searchsorted(stored.ts, incoming.ts)
    clipped = np.minimum(position, len(stored) - 1)
    existing = stored.ts[clipped] == incoming.ts
    old = stored.values()[:, clipped[existing]]
    new = incoming.values()[:, existing]
    differs = (old.view(np.int64) != new.view(np.int64)).any(axis=0)  # bitwise: -0.0 vs 0.0 is a change too
    added = ~existing
    if not added.any() and not differs.any():
        return Merge(stored, 0, 0)
    keep = np.ones(len(stored), dtype=bool)
    keep[clipped[existing]] = False
    ts = np.concatenate([stored.ts[keep], incoming.ts])
    values = np.concatenate([stored.values()[:, keep], incoming.values()], axis=1)
    order = np.argsort(ts, kind="stable")
    merged = Columns.from_values(ts[order], values[:, order])
    return Merge(merged, int(added.sum()), int(differs.sum()))
