"""Reading bars, the one read path of every job kind, preview and task: :func:`load_bars` over the column store."""

from __future__ import annotations

import datetime as dt
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from numpy.typing import NDArray
from sqlalchemy import Connection

from shared.marketdata import store
from shared.marketdata.series import DEFAULT_TIMEFRAME, SECONDS_PER_DAY, Columns, day_ts

# What a symbol may look like everywhere (API requests, CSV imports): upper-case letters, digits and
# . - ^ = _ (e.g. BRK.B, BF-B), starting with a letter or digit, at most 32 characters.
SYMBOL_PATTERN = re.compile(r"[A-Z0-9][A-Z0-9.\-^=_]{0,31}")


@dataclass(frozen=True)
class SymbolBars:
    """One symbol's bars, oldest first: ``ts`` (epoch seconds, UTC) and float64 columns, read-only (they may be
    shared with the process's cache), with the data version they were read at."""

    symbol: str
    ts: NDArray[np.int64]
    open: NDArray[np.float64]
    high: NDArray[np.float64]
    low: NDArray[np.float64]
    close: NDArray[np.float64]
    volume: NDArray[np.float64]
    version: int = 0
    timeframe: str = DEFAULT_TIMEFRAME

    def __len__(self) -> int:
        return len(self.ts)

    @classmethod
    def of(cls, symbol: str, columns: Columns, version: int = 0, timeframe: str = DEFAULT_TIMEFRAME) -> SymbolBars:
        return cls(symbol, columns.ts, columns.open, columns.high, columns.low, columns.close, columns.volume,
                   version, timeframe)  # fmt: skip

    @classmethod
    def from_dates(
        cls, symbol: str, dates: Sequence[str | dt.date] | NDArray[np.datetime64], open: object, high: object,
        low: object, close: object, volume: object,
    ) -> SymbolBars:  # fmt: skip
        """Daily bars from ISO dates (or dates) and array-likes."""
        days = np.asarray(dates, dtype="datetime64[D]").astype(np.int64)
        return cls.of(symbol, store.columns_of(days * SECONDS_PER_DAY, open, high, low, close, volume))

    @property
    def days(self) -> NDArray[np.datetime64]:
        """Each bar's date (``datetime64[D]``)."""
        return (self.ts // SECONDS_PER_DAY).astype("datetime64[D]")

    @cached_property
    def dates(self) -> tuple[str, ...]:
        """ISO dates, as scripts see them."""
        return tuple(np.datetime_as_string(self.days).tolist())


@dataclass(frozen=True)
class DataStamp:
    """Which data a job is computed from: the SHA-256 of its symbols' data versions at one timeframe (``symbol:version``
    lines, sorted; 0 for a symbol without bars), and the newest of those versions (None: no bars at all)."""

    sha256: str
    version: int | None


def data_stamp(conn: Connection, symbols: Sequence[str], timeframe: str = DEFAULT_TIMEFRAME) -> DataStamp:
    """The data a job over ``symbols`` is computed from, as of now (a submission stamps its job with it)."""
    versions = store.versions(conn, symbols, timeframe)
    lines = "\n".join(f"{symbol}:{versions.get(symbol, 0)}" for symbol in sorted(set(symbols)))
    digest = hashlib.sha256(f"{timeframe}\n{lines}".encode()).hexdigest()
    return DataStamp(digest, max(versions.values(), default=None))


def load_bars(
    conn: Connection,
    symbols: Sequence[str],
    start: dt.date | None,
    end: dt.date | None,
    *,
    timeframe: str = DEFAULT_TIMEFRAME,
) -> dict[str, SymbolBars]:
    """Bars of ``symbols`` within [start, end], from this process's cache, then the database (marketdata/store.py).
    Symbols without bars in the range are absent. Each symbol's bars are one committed version
    (``SymbolBars.version``)."""
    found = store.read_series(conn, symbols, timeframe, *_range_ts(start, end))
    return {symbol: SymbolBars.of(symbol, s.columns, s.version, timeframe) for symbol, s in found.items()}


def _range_ts(start: dt.date | None, end: dt.date | None) -> tuple[int | None, int | None]:
    return (None if start is None else day_ts(start)), (None if end is None else day_ts(end))


def has_bars(conn: Connection, symbols: Sequence[str], start: dt.date | None, end: dt.date | None) -> bool:
    """Whether any of ``symbols`` has a daily bar within [start, end]."""
    return store.has_bars(conn, symbols, DEFAULT_TIMEFRAME, *_range_ts(start, end))
