"""Bars as the engine takes them: plain aligned numpy arrays, checked once.

A timeframe says what a bar is. Daily or coarser bars (``1d``, ``1w``, ``1mo``) carry ``dates`` as
``datetime64[D]``; intraday bars (``1m``, ``5m``, ``15m``, ``30m``, ``1h``) carry UTC instants as
``datetime64[s]``. :func:`format_bar_dates` is the one way a bar's date becomes text.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any, overload

import numpy as np
from numpy.typing import NDArray

INTRADAY_TIMEFRAMES = ("1m", "5m", "15m", "30m", "1h")
TIMEFRAMES = (*INTRADAY_TIMEFRAMES, "1d", "1w", "1mo")


class BarsError(ValueError):
    """The arrays do not describe a usable bar series (the message names the array and the bar)."""


def date_unit(timeframe: str) -> str:
    """The numpy unit of a timeframe's ``dates``: ``"s"`` (UTC instants) intraday, ``"D"`` otherwise."""
    if timeframe not in TIMEFRAMES:
        raise BarsError(f"timeframe: {timeframe!r} is not one of {', '.join(TIMEFRAMES)}")
    return "s" if timeframe in INTRADAY_TIMEFRAMES else "D"


@overload
def format_bar_dates(dates: np.datetime64) -> str: ...
@overload
def format_bar_dates(dates: NDArray[np.datetime64]) -> list[str]: ...
def format_bar_dates(dates: np.datetime64 | NDArray[np.datetime64]) -> str | list[str]:
    """Bar dates as text: ``'YYYY-MM-DD'`` for day dates (``datetime64[D]``), ISO 8601 UTC
    ``'YYYY-MM-DDTHH:MM:SSZ'`` for instants (any finer unit, to the second). One date in, one string out; an
    array in, a list out."""
    day = np.datetime_data(dates.dtype)[0] in ("D", "W", "M", "Y")
    text = (
        np.datetime_as_string(dates, unit="D")
        if day
        else np.datetime_as_string(dates.astype("datetime64[s]"), unit="s", timezone="UTC")
    )
    return str(text) if np.ndim(text) == 0 else [str(t) for t in text.tolist()]


def _as_instants(dates: Any) -> NDArray[np.datetime64]:
    """``datetime64[s]`` of dates: naive values are UTC, aware ones (datetimes, ISO offsets or 'Z') converted."""
    if isinstance(dates, Sequence) and not isinstance(dates, str):
        dates = [d.astimezone(UTC).replace(tzinfo=None) if isinstance(d, datetime) and d.tzinfo else d
                 for d in dates]  # fmt: skip
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="no explicit representation of timezones")
        return np.asarray(dates, dtype="datetime64[s]")


@dataclass(frozen=True)
class Bars:
    """OHLCV bars, oldest first, of one ``timeframe`` (default ``"1d"``). ``dates`` is ``datetime64[D]``
    (daily or coarser) or ``datetime64[s]`` UTC instants (intraday), strictly increasing."""

    open: NDArray[np.float64]
    high: NDArray[np.float64]
    low: NDArray[np.float64]
    close: NDArray[np.float64]
    volume: NDArray[np.float64]
    dates: NDArray[np.datetime64]
    timeframe: str = "1d"

    def __post_init__(self) -> None:
        unit = date_unit(self.timeframe)
        if np.datetime_data(self.dates.dtype)[0] != unit:
            raise BarsError(f"dates: {self.timeframe} bars need datetime64[{unit}] dates, got {self.dates.dtype}")

    def __len__(self) -> int:
        return len(self.close)

    @property
    def intraday(self) -> bool:
        return self.timeframe in INTRADAY_TIMEFRAMES

    @property
    def bars_per_day(self) -> float:
        """1 for daily or coarser bars; intraday, the median number of bars per UTC calendar day with bars (a
        property of the session, e.g. 24 hourly bars for FX, 7 for a US stock: no price enters it)."""
        if not self.intraday or not len(self):
            return 1.0
        days = self.dates.astype("datetime64[D]").astype(np.int64)
        edges = np.flatnonzero(np.r_[True, days[1:] != days[:-1], True])
        return float(np.median(np.diff(edges)))

    @classmethod
    def from_arrays(
        cls,
        *,
        open: Any,
        high: Any,
        low: Any,
        close: Any,
        volume: Any,
        dates: Sequence[date | str] | NDArray[Any],
        timeframe: str = "1d",
    ) -> Bars:
        """Convert and validate: equal lengths, finite positive prices, non-negative volume, sorted dates.

        ``timeframe`` is one of ``TIMEFRAMES``. Daily or coarser: ``dates`` become ``datetime64[D]``. Intraday:
        ``dates`` become UTC instants, ``datetime64[s]`` (naive values are taken as UTC, aware ones converted),
        strictly increasing. The arrays are always fresh, writable, contiguous float64 copies: the compiled
        kernels then see one array type (a read-only view, as pandas hands out, would compile and cache a second
        variant).
        """
        unit = date_unit(timeframe)
        arrays = {
            name: np.array(values, dtype=np.float64, order="C", copy=True)
            for name, values in (("open", open), ("high", high), ("low", low), ("close", close), ("volume", volume))
        }
        try:
            day = np.asarray(dates, dtype="datetime64[D]") if unit == "D" else _as_instants(dates)
        except (TypeError, ValueError) as exc:
            raise BarsError(f"dates: not convertible to dates ({exc})") from None
        n = len(day)
        if n == 0:
            raise BarsError("dates: no bars")
        for name, values in arrays.items():
            if values.ndim != 1 or len(values) != n:
                raise BarsError(f"{name}: expected {n} values (one per date), got shape {values.shape}")
            bad = ~np.isfinite(values) | (values < 0 if name == "volume" else values <= 0)
            if bad.any():
                i = int(np.argmax(bad))
                what = "finite and >= 0" if name == "volume" else "finite and > 0"
                raise BarsError(f"{name}[{i}] ({format_bar_dates(day[i])}): {values[i]!r} is not {what}")
        if n > 1 and not (day[1:] > day[:-1]).all():
            i = int(np.argmax(~(day[1:] > day[:-1]))) + 1
            raise BarsError(f"dates[{i}] ({format_bar_dates(day[i])}): dates must be strictly increasing")
        return cls(dates=day, timeframe=timeframe, **arrays)

    def sliced(self, lo: int, hi: int) -> Bars:
        """Bars ``lo:hi`` (views, same timeframe)."""
        return Bars(
            open=self.open[lo:hi], high=self.high[lo:hi], low=self.low[lo:hi], close=self.close[lo:hi],
            volume=self.volume[lo:hi], dates=self.dates[lo:hi], timeframe=self.timeframe,
        )  # fmt: skip

    def between(self, start: date | None, end: date | None) -> Bars:
        """The bars with ``start <= date <= end`` (either bound optional).

        Intraday, a ``date`` bound covers its whole UTC calendar day (``end`` includes every bar of that day); a
        ``datetime`` bound is an instant (naive = UTC), inclusive. Daily bars compare days only."""
        lo = 0 if start is None else int(np.searchsorted(self.dates, self._bound(start, False), side="left"))
        hi = len(self) if end is None else int(np.searchsorted(self.dates, self._bound(end, True), side="right"))
        if lo == 0 and hi == len(self):
            return self
        if hi <= lo:
            raise BarsError(f"no bars between {start} and {end}")
        return self.sliced(lo, hi)

    def _bound(self, value: date, end: bool) -> np.datetime64:
        if not self.intraday:
            return np.datetime64(value, "D")
        if isinstance(value, datetime):
            return _as_instants([value])[0]
        day = np.datetime64(value, "D")
        return (day + 1).astype("datetime64[s]") - 1 if end else day.astype("datetime64[s]")
