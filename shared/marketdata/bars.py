"""Reading daily bars: one query per shard, columns as compact float arrays per symbol."""

from __future__ import annotations

import datetime as dt
import re
from array import array
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import Connection, text

# What a symbol may look like everywhere (API requests, CSV imports): upper-case letters, digits and
# . - ^ = _ (e.g. BRK.B, BF-B), starting with a letter or digit, at most 32 characters.
SYMBOL_PATTERN = re.compile(r"[A-Z0-9][A-Z0-9.\-^=_]{0,31}")


@dataclass(frozen=True)
class SymbolBars:
    """One symbol's daily bars, oldest first. Arrays are ``array('d')`` (compact, cheap to ship)."""

    symbol: str
    dates: tuple[str, ...]  # ISO dates
    open: array
    high: array
    low: array
    close: array
    volume: array

    def __len__(self) -> int:
        return len(self.dates)


_LOAD_SQL = text(
    """
    SELECT symbol, date, open, high, low, close, volume
    FROM daily_bars
    WHERE symbol = ANY(:symbols)
      AND (CAST(:start AS date) IS NULL OR date >= CAST(:start AS date))
      AND (CAST(:end AS date) IS NULL OR date <= CAST(:end AS date))
    ORDER BY symbol, date
    """
)


def load_bars(
    conn: Connection, symbols: Sequence[str], start: dt.date | None, end: dt.date | None
) -> dict[str, SymbolBars]:
    """Bars of ``symbols`` within [start, end] in one query. Symbols without bars are absent."""
    columns: dict[str, tuple[list[str], array, array, array, array, array]] = {}
    current: str | None = None
    cols: tuple[list[str], array, array, array, array, array] | None = None
    result = conn.execute(_LOAD_SQL, {"symbols": list(symbols), "start": start, "end": end})
    for symbol, date, o, h, low, c, v in result:
        if symbol != current:
            current = symbol
            cols = ([], array("d"), array("d"), array("d"), array("d"), array("d"))
            columns[symbol] = cols
        assert cols is not None
        cols[0].append(date.isoformat())
        cols[1].append(o)
        cols[2].append(h)
        cols[3].append(low)
        cols[4].append(c)
        cols[5].append(v)
    return {symbol: SymbolBars(symbol, tuple(d), o, h, low, c, v) for symbol, (d, o, h, low, c, v) in columns.items()}
