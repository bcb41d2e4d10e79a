"""Reading bars, the one read path of every job kind, preview and task: :func:`load_bars`.

A read asks for a timeframe and an adjustment. The configured provider (shared/marketdata/providers.py) serves the
stored series: the timeframe itself when a symbol has it, else the nearest finer stored timeframe that divides it
(``1w`` and ``1mo`` come from ``1d``), resampled in the symbol's exchange time zone (shared/marketdata/resample.py).
Prices are adjusted for the symbol's corporate actions before resampling (shared/marketdata/adjust.py); the data
version of a series moves with its actions as with its bars, so a version names the adjusted bars too.

Date bounds are the symbol's local trading dates, for intraday bars as for daily ones.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TypeVar

import numpy as np
from numpy.typing import NDArray
from sqlalchemy import Connection, text
from sqlalchemy.orm import Session, sessionmaker

from shared.marketdata import providers, store
from shared.marketdata.actions import read_actions
from shared.marketdata.adjust import adjust
from shared.marketdata.resample import can_serve, is_intraday, local_days, resample
from shared.marketdata.series import (
    DEFAULT_TIMEFRAME,
    SECONDS_PER_DAY,
    SYMBOL_PATTERN,
    TIMEFRAME_SECONDS,
    Columns,
    day_ts,
)
from shared.marketdata.store import Series

__all__ = ["SYMBOL_PATTERN", "DataStamp", "SymbolBars", "data_stamp", "has_bars", "load_bars"]


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
    adjustment: str = "none"

    def __len__(self) -> int:
        return len(self.ts)

    @classmethod
    def of(
        cls,
        symbol: str,
        columns: Columns,
        version: int = 0,
        timeframe: str = DEFAULT_TIMEFRAME,
        adjustment: str = "none",
    ) -> SymbolBars:
        return cls(symbol, columns.ts, columns.open, columns.high, columns.low, columns.close, columns.volume,
                   version, timeframe, adjustment)  # fmt: skip

    @classmethod
    def from_dates(
        cls, symbol: str, dates: Sequence[str | dt.date] | NDArray[np.datetime64], open: object, high: object,
        low: object, close: object, volume: object, timeframe: str = DEFAULT_TIMEFRAME,
    ) -> SymbolBars:  # fmt: skip
        """Bars from ISO dates (or dates, or for intraday bars ``datetime64`` UTC instants) and array-likes."""
        unit = "s" if is_intraday(timeframe) else "D"
        ts = np.asarray(dates, dtype=f"datetime64[{unit}]").astype("datetime64[s]").astype(np.int64)
        return cls.of(symbol, store.columns_of(ts, open, high, low, close, volume), timeframe=timeframe)

    @property
    def intraday(self) -> bool:
        return is_intraday(self.timeframe)

    @property
    def days(self) -> NDArray[np.datetime64]:
        """Each bar's date (``datetime64[D]``; an intraday bar's UTC date)."""
        return (self.ts // SECONDS_PER_DAY).astype("datetime64[D]")

    @property
    def instants(self) -> NDArray[np.datetime64]:
        """Each bar's time as the engine takes it: ``datetime64[D]`` dates, or ``datetime64[s]`` UTC instants for
        intraday bars."""
        return self.ts.astype("datetime64[s]") if self.intraday else self.days

    @cached_property
    def dates(self) -> tuple[str, ...]:
        """As scripts see them: ISO dates (``2024-01-02``), or for intraday bars ISO UTC timestamps
        (``2024-01-02T14:30:00Z``)."""
        return tuple(iso_times(self.ts, self.timeframe))


def iso_times(ts: NDArray[np.int64], timeframe: str) -> list[str]:
    """``ts`` as ISO text: dates for daily and coarser bars, UTC timestamps with ``Z`` for intraday ones."""
    if not is_intraday(timeframe):
        days = ts // SECONDS_PER_DAY
        if len(days) and days[0] >= _FIRST_DAY and days[-1] < _FIRST_DAY + len(_day_texts()):
            return _day_texts()[days - _FIRST_DAY].tolist()  # a lookup: 20x faster than formatting each date
        return np.datetime_as_string(days.astype("datetime64[D]")).tolist()
    return [f"{text}Z" for text in np.datetime_as_string(ts.astype("datetime64[s]")).tolist()]


_FIRST_DAY = (dt.date(1900, 1, 1) - dt.date(1970, 1, 1)).days


@functools.cache
def _day_texts() -> NDArray[np.object_]:
    """ISO text of every date from 1900 to 2099 (73,000 strings, made once per process)."""
    last = (dt.date(2100, 1, 1) - dt.date(1970, 1, 1)).days
    days = np.arange(_FIRST_DAY, last, dtype=np.int64).astype("datetime64[D]")
    return np.datetime_as_string(days).astype(object)


@dataclass(frozen=True)
class DataStamp:
    """Which data a job is computed from: the SHA-256 of its symbols' data versions at one timeframe (``symbol:version``
    lines, sorted; 0 for a symbol without bars), and the newest of those versions (None: no bars at all)."""

    sha256: str
    version: int | None


def sources(timeframe: str) -> list[str]:
    """The stored timeframes that serve ``timeframe``, in the order a read tries them: itself, then finer ones that
    divide it, coarsest first (``1w``: ``1d``, ``1h``, ``30m``, ...)."""
    finer = [tf for tf in reversed(TIMEFRAME_SECONDS) if can_serve(tf, timeframe)]
    return ([timeframe] if timeframe in TIMEFRAME_SECONDS else []) + finer


_T = TypeVar("_T")


def _by_source(
    symbols: Sequence[str], timeframe: str, fetch: Callable[[list[str], str], Mapping[str, _T]]
) -> dict[str, tuple[str, _T]]:
    """``fetch(symbols, source)`` from each source of ``timeframe`` in turn (:func:`sources`) for the symbols the
    sources before it lacked: each symbol's source and what it gave (symbols no source has absent)."""
    found: dict[str, tuple[str, _T]] = {}
    for source in sources(timeframe):
        missing = [s for s in symbols if s not in found]
        if not missing:
            break
        found |= {s: (source, value) for s, value in fetch(missing, source).items()}
    return found


DEFAULT_BATCH_BARS = 2_000_000  # ALPHAFORGE_BATCH_BARS


def series_sizes(
    conn: Connection,
    symbols: Sequence[str],
    timeframe: str,
    start: dt.date | None = None,
    end: dt.date | None = None,
) -> dict[str, int]:
    """At most how many bars of each symbol's series that serves ``timeframe`` a read of [start, end] holds (its
    source's, before resampling; from metadata; symbols without one absent)."""
    provider = providers.current()

    def sizes(missing: list[str], source: str) -> dict[str, int]:
        return provider.sizes(conn, missing, source, *_range_ts(start, end, is_intraday(source)))

    found = _by_source(symbols, timeframe, sizes)
    return {symbol: size for symbol, (_, size) in found.items()}


def batches(
    conn: Connection,
    symbols: Sequence[str],
    timeframe: str,
    max_bars: int,
    start: dt.date | None = None,
    end: dt.date | None = None,
) -> list[list[str]]:
    """``symbols`` in order, cut into runs whose series (at ``timeframe``'s source) hold at most ``max_bars`` bars
    together, at least one symbol each: what a shard reads and computes at a time (``ALPHAFORGE_BATCH_BARS``), so
    that its memory does not grow with the bars' timeframe. A symbol without bars weighs nothing."""
    sizes = series_sizes(conn, symbols, timeframe, start, end)
    out: list[list[str]] = []
    weight = 0
    for symbol in symbols:
        size = sizes.get(symbol, 0)
        if not out or (size and weight and weight + size > max_bars):
            out.append([])
            weight = 0
        out[-1].append(symbol)
        weight += size
    return out


def bar_batches(
    factory: sessionmaker[Session],
    symbols: Sequence[str],
    start: dt.date | None,
    end: dt.date | None,
    *,
    timeframe: str,
    adjustment: str,
    max_bars: int,
) -> Iterator[tuple[list[str], dict[str, SymbolBars]]]:
    """A shard's symbols in order, a batch of at most ``max_bars`` bars at a time (``bars.batches``), each batch's
    bars read in a session of its own (symbols without bars absent): what a shard holds at once does not grow with
    the timeframe."""
    with factory() as session:
        groups = batches(session.connection(), symbols, timeframe, max_bars, start, end)
    for group in groups:
        with factory() as session:
            bars = load_bars(session.connection(), group, start, end, timeframe=timeframe, adjustment=adjustment)
        yield group, bars


def data_stamp(conn: Connection, symbols: Sequence[str], timeframe: str = DEFAULT_TIMEFRAME) -> DataStamp:
    """The data a job over ``symbols`` is computed from, as of now (a submission stamps its job with it)."""
    provider = providers.current()
    found = _by_source(symbols, timeframe, lambda missing, source: provider.versions(conn, missing, source))
    versions = {symbol: version for symbol, (_, version) in found.items()}
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
    adjustment: str = "none",
) -> dict[str, SymbolBars]:
    """Bars of ``symbols`` at ``timeframe`` on the local trading dates [start, end], adjusted (``none``, ``splits``,
    ``total_return``). Symbols without bars in the range are absent. Each symbol's bars are one committed version
    of its source series (``SymbolBars.version``)."""
    found = _read(conn, symbols, timeframe, start, end)
    if not found:
        return {}
    intraday = [s for s, (source, _) in found.items() if is_intraday(source)]
    zones = exchange_zones(conn, intraday) if intraday else {}
    actions = read_actions(conn, list(found)) if adjustment != "none" else {}
    out: dict[str, SymbolBars] = {}
    for symbol, (source, series) in found.items():
        columns = series.columns
        zone = zones.get(symbol, DEFAULT_ZONE)
        days = local_days(columns.ts, source, zone)
        if is_intraday(source):  # the bounds are local dates: the read took a day more on each side
            lo = 0 if start is None else int(np.searchsorted(days, (start - _EPOCH).days, side="left"))
            hi = len(days) if end is None else int(np.searchsorted(days, (end - _EPOCH).days, side="right"))
            columns, days = columns.take(lo, hi), days[lo:hi]
            if not len(columns):
                continue
        if adjustment != "none":
            columns = adjust(columns, days, actions[symbol], adjustment)
        if source != timeframe:
            columns = resample(columns, source, timeframe, zone)
        out[symbol] = SymbolBars.of(symbol, columns, series.version, timeframe, adjustment)
    return out


DEFAULT_ZONE = "America/New_York"
_EPOCH = dt.date(1970, 1, 1)


def _read(
    conn: Connection, symbols: Sequence[str], timeframe: str, start: dt.date | None, end: dt.date | None
) -> dict[str, tuple[str, Series]]:
    """Each symbol's stored series that serves ``timeframe`` (see :func:`sources`), read from the provider."""
    provider = providers.current()

    def read(missing: list[str], source: str) -> dict[str, Series]:
        return provider.read(conn, missing, source, *_range_ts(start, end, is_intraday(source)))

    found = _by_source(symbols, timeframe, read)
    return {symbol: found[symbol] for symbol in symbols if symbol in found}


def _range_ts(start: dt.date | None, end: dt.date | None, intraday: bool = False) -> tuple[int | None, int | None]:
    """The ``ts`` bounds of local dates [start, end]: exact for daily bars, a day wider each side for intraday ones
    (any exchange's local date lies within a day of the UTC one)."""
    margin = SECONDS_PER_DAY if intraday else 0
    return (
        None if start is None else day_ts(start) - margin,
        None if end is None else day_ts(end) + (2 * margin - 1 if intraday else 0),
    )


def exchange_zones(conn: Connection, symbols: Sequence[str]) -> dict[str, str]:
    """Each symbol's exchange time zone (symbols.exchange_tz)."""
    rows = conn.execute(
        text("SELECT symbol, exchange_tz FROM symbols WHERE symbol = ANY(CAST(:symbols AS varchar[]))"),
        {"symbols": list(symbols)},
    )
    return {symbol: zone for symbol, zone in rows}


def has_bars(
    conn: Connection,
    symbols: Sequence[str],
    start: dt.date | None,
    end: dt.date | None,
    timeframe: str = DEFAULT_TIMEFRAME,
) -> bool:
    """Whether any of ``symbols`` has a bar at ``timeframe`` within [start, end] (20 symbols read at a time)."""
    return any(
        load_bars(conn, symbols[lo : lo + 20], start, end, timeframe=timeframe) for lo in range(0, len(symbols), 20)
    )
