"""Listing ranges: which symbols traded on a given day, for universes taken as of a date (no survivorship bias).

A symbol is listed from its first trading date to its last: ``symbols.listed_on`` .. ``symbols.delisted_on`` (NULL:
still listed). A delisted symbol keeps its row and its bars, so a universe taken as of a day before its delisting
still holds it, and one taken after does not.

The first trading date is never later than the symbol's first bar: what is used is the earlier of ``listed_on`` and
the date of the first bar of any of its series (from ``bar_series.first_ts``, one row per series, so it costs a
small join), computed in the query itself. An as-of query is therefore right whether or not the import that wrote
the bars kept ``listed_on`` current; :func:`refresh_listed_on` stores the same date, for readers of the column. A
daily bar's date is its ``ts`` in UTC (its date at 00:00 UTC); an intraday bar's is its time in the symbol's
``exchange_tz``. A symbol with neither ``listed_on`` nor bars is not listed on any day.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import Connection, text

# The date of each symbol's first bar, over all its series (``:symbols`` NULL: every symbol).
_FIRST_BAR_DAY = """
SELECT h.symbol, min(CASE WHEN h.timeframe = '1d' THEN (to_timestamp(h.first_ts) AT TIME ZONE 'UTC')::date
                          ELSE (to_timestamp(h.first_ts) AT TIME ZONE s.exchange_tz)::date END) AS day
FROM bar_series h JOIN symbols s ON s.symbol = h.symbol
WHERE h.bars > 0 AND (CAST(:symbols AS varchar[]) IS NULL OR h.symbol = ANY(CAST(:symbols AS varchar[])))
GROUP BY h.symbol
"""

_RANGES = f"""
WITH first_bar AS ({_FIRST_BAR_DAY})
SELECT s.symbol, least(s.listed_on, f.day) AS listed_on, s.delisted_on
FROM symbols s LEFT JOIN first_bar f ON f.symbol = s.symbol
WHERE CAST(:symbols AS varchar[]) IS NULL OR s.symbol = ANY(CAST(:symbols AS varchar[]))
"""

_LISTED_AS_OF = f"""
SELECT symbol FROM ({_RANGES}) r
WHERE r.listed_on <= :day AND (r.delisted_on IS NULL OR :day <= r.delisted_on)
ORDER BY symbol
"""

_REFRESH = f"""
WITH first_bar AS ({_FIRST_BAR_DAY})
UPDATE symbols s SET listed_on = least(s.listed_on, f.day)
FROM first_bar f
WHERE f.symbol = s.symbol AND s.listed_on IS DISTINCT FROM least(s.listed_on, f.day)
"""


@dataclass(frozen=True)
class Listing:
    """A symbol's listing range: first trading date (None: unknown, no bars) and last (None: still listed)."""

    listed_on: dt.date | None
    delisted_on: dt.date | None

    def contains(self, day: dt.date) -> bool:
        return (
            self.listed_on is not None
            and self.listed_on <= day
            and (self.delisted_on is None or day <= self.delisted_on)
        )


def _symbols_param(symbols: Sequence[str] | None) -> list[str] | None:
    return None if symbols is None else list(dict.fromkeys(symbols))


def listed_as_of(conn: Connection, day: dt.date, symbols: Sequence[str] | None = None) -> list[str]:
    """The symbols whose listing range contains ``day`` (``listed_on <= day`` and, if delisted, ``day <=
    delisted_on``): of ``symbols`` in their order (a repeated one once), or of every symbol by name when None."""
    if symbols is not None and not symbols:
        return []
    found = list(conn.scalars(text(_LISTED_AS_OF), {"day": day, "symbols": _symbols_param(symbols)}))
    if symbols is None:
        return found
    listed = set(found)
    return [symbol for symbol in dict.fromkeys(symbols) if symbol in listed]


def listings(conn: Connection, symbols: Sequence[str]) -> dict[str, Listing]:
    """The listing range of each of ``symbols`` that is a known symbol."""
    if not symbols:
        return {}
    rows = conn.execute(text(_RANGES), {"symbols": _symbols_param(symbols)})
    return {symbol: Listing(listed_on, delisted_on) for symbol, listed_on, delisted_on in rows}


def refresh_listed_on(conn: Connection, symbols: Sequence[str] | None) -> int:
    """In ``conn``'s transaction: set ``listed_on`` of ``symbols`` (None: every symbol) to the earlier of its value
    and the date of the symbol's first bar; returns how many symbols changed. Call it after bars are written."""
    if symbols is not None and not symbols:
        return 0
    return conn.execute(text(_REFRESH), {"symbols": _symbols_param(symbols)}).rowcount
