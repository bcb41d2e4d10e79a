"""Coarser bars from stored ones (pure code, numpy only): 1m bars as 5m, 1h, 1d, 1w or 1mo bars, and the like.

Buckets are formed in the symbol's exchange time zone. An intraday bucket is the bar's local wall-clock time floored
to the target length from local midnight (pandas' ``resample`` with its default origin ``start_day``); its ``ts`` is
the bucket's start in UTC, so a repeated local hour (the autumn DST change) makes two buckets, as in pandas. Daily or
coarser buckets are local dates: a 1d bar's ``ts`` is its local date at 00:00 UTC, a 1w bar's the Monday of its week
(Monday..Sunday), a 1mo bar's the first day of its month, like stored daily bars. Empty buckets make no bar.

UTC offsets come from :mod:`zoneinfo`: the zone's transitions in the bars' range (found by sampling each day and
bisecting to the second, cached per zone and year) are laid over the bars with ``searchsorted``, never bar by bar.
"""

from __future__ import annotations

import datetime as dt
import functools
from zoneinfo import ZoneInfo

import numpy as np
from numpy.typing import NDArray

from shared.marketdata.series import SECONDS_PER_DAY, TIMEFRAME_SECONDS, Columns

# Served timeframes, finest first: the stored ones and the calendar ones made only by resampling.
SERVED_TIMEFRAMES: tuple[str, ...] = (*TIMEFRAME_SECONDS, "1w", "1mo")
_RANK = {timeframe: rank for rank, timeframe in enumerate(SERVED_TIMEFRAMES)}


def is_intraday(timeframe: str) -> bool:
    """Whether bars at ``timeframe`` are shorter than a day (their ``ts`` is an instant, not a date)."""
    if timeframe not in _RANK:
        raise ValueError(f"unknown timeframe {timeframe!r}; expected one of {', '.join(SERVED_TIMEFRAMES)}")
    return TIMEFRAME_SECONDS.get(timeframe, SECONDS_PER_DAY) < SECONDS_PER_DAY


def can_serve(source: str, target: str) -> bool:
    """Whether :func:`resample` makes ``target`` bars from stored ``source`` bars: ``target`` strictly coarser and,
    when intraday, a whole multiple of ``source``. (A timeframe serves itself without resampling.)"""
    if source not in TIMEFRAME_SECONDS or target not in _RANK or _RANK[target] <= _RANK[source]:
        return False
    return not is_intraday(target) or TIMEFRAME_SECONDS[target] % TIMEFRAME_SECONDS[source] == 0


def resample(columns: Columns, source: str, target: str, tz: str) -> Columns:
    """``columns`` (bars at stored timeframe ``source``) aggregated to the coarser ``target`` in time zone ``tz`` (an
    IANA name; unused when ``source`` is 1d): first open, highest high, lowest low, last close, summed volume.
    Raises ValueError for a pair :func:`can_serve` refuses."""
    if not can_serve(source, target):
        raise ValueError(f"cannot resample {source!r} bars to {target!r}")
    ts = np.asarray(columns.ts, dtype=np.int64)
    if not len(ts):
        return Columns(np.empty(0, np.int64), *(np.empty(0, np.float64) for _ in range(5)))
    if source == "1d":
        keys = ts // SECONDS_PER_DAY
    else:
        local = ts + _utc_offsets(ts, tz)
        keys = ts - local % TIMEFRAME_SECONDS[target] if is_intraday(target) else local // SECONDS_PER_DAY
    starts = _runs(keys)
    labels = keys[starts]
    if target in ("1w", "1mo"):  # from the days' runs, not from every bar
        if target == "1w":
            labels = labels - (labels + 3) % 7  # epoch day 0 was a Thursday; Monday's (day + 3) % 7 is 0
        else:
            labels = labels.astype("datetime64[D]").astype("datetime64[M]").astype("datetime64[D]").astype(np.int64)
        runs = _runs(labels)
        starts, labels = starts[runs], labels[runs]
    ends = np.r_[starts[1:], len(ts)] - 1
    out_ts = labels if is_intraday(target) else labels * SECONDS_PER_DAY
    return Columns(
        np.ascontiguousarray(out_ts, dtype=np.int64),
        np.asarray(columns.open, dtype=np.float64)[starts],
        np.maximum.reduceat(np.asarray(columns.high, dtype=np.float64), starts),
        np.minimum.reduceat(np.asarray(columns.low, dtype=np.float64), starts),
        np.asarray(columns.close, dtype=np.float64)[ends],
        np.add.reduceat(np.asarray(columns.volume, dtype=np.float64), starts),
    )


def _runs(keys: NDArray[np.int64]) -> NDArray[np.int64]:
    """Where each run of equal ``keys`` starts. Keys only go back where a clock is set back (a bar whose bucket would
    start before its predecessor's): such a bar joins its predecessor's bucket, so buckets stay in time order."""
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    if np.any(keys[starts[1:]] < keys[starts[:-1]]):
        return _runs(np.maximum.accumulate(keys))
    return starts


def local_days(ts: NDArray[np.int64], timeframe: str, tz: str) -> NDArray[np.int64]:
    """Each bar's local trading date as epoch days: a daily (or coarser) bar's own date, an intraday bar's date in
    ``tz`` (what :func:`shared.marketdata.adjust.adjust` takes as ``days``)."""
    ts = np.asarray(ts, dtype=np.int64)
    if not is_intraday(timeframe) or not len(ts):
        return ts // SECONDS_PER_DAY
    return (ts + _utc_offsets(ts, tz)) // SECONDS_PER_DAY


def _utc_offsets(ts: NDArray[np.int64], tz: str) -> NDArray[np.int64]:
    """The UTC offset in seconds of ``tz`` at each of the sorted instants ``ts``."""
    zone = ZoneInfo(tz)
    lo, hi = int(ts[0]), int(ts[-1])
    first_year, last_year = (_utc_year(t) for t in (lo, hi))
    changes = [c for year in range(first_year, last_year + 1) for c in _transitions(tz, year) if lo < c[0] <= hi]
    if not changes:
        return np.full(len(ts), _offset(zone, lo), dtype=np.int64)
    instants, offsets = np.array(changes, dtype=np.int64).T
    bounds = np.r_[0, np.searchsorted(ts, instants, side="left"), len(ts)]
    return np.repeat(np.r_[_offset(zone, lo), offsets], np.diff(bounds))


@functools.lru_cache(maxsize=4096)
def _transitions(tz: str, year: int) -> tuple[tuple[int, int], ...]:
    """The instants (epoch seconds) in UTC calendar ``year`` from which ``tz`` has a new UTC offset, with that offset.
    Found by sampling each day's 00:00 UTC and bisecting to the second (two changes within a day that cancel out,
    which no zone has, would be missed)."""
    zone = ZoneInfo(tz)
    start = int(dt.datetime(year, 1, 1, tzinfo=dt.UTC).timestamp())
    end = int(dt.datetime(year + 1, 1, 1, tzinfo=dt.UTC).timestamp())
    changes: list[tuple[int, int]] = []
    before = _offset(zone, start - 1)
    for day in range(start, end, SECONDS_PER_DAY):
        a, b = day - 1, min(day + SECONDS_PER_DAY, end) - 1  # changes in (a, b]
        after = _offset(zone, b)
        while after != before:  # the first instant in (a, b] with another offset, then look on past it
            left, right = a, b
            while right - left > 1:
                mid = (left + right) // 2
                left, right = (mid, right) if _offset(zone, mid) == before else (left, mid)
            before = _offset(zone, right)
            changes.append((right, before))
            a = right
        before = after
    return tuple(changes)


def _offset(zone: ZoneInfo, t: int) -> int:
    offset = dt.datetime.fromtimestamp(t, zone).utcoffset()
    return 0 if offset is None else int(offset.total_seconds())


def _utc_year(t: int) -> int:
    return int(np.datetime64(t, "s").astype("datetime64[Y]").astype(np.int64)) + 1970
