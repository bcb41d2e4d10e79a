"""Resampling bars (pure): the same bars as pandas' ``resample`` in the exchange's time zone, bit for bit."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from shared.marketdata.resample import SERVED_TIMEFRAMES, can_serve, is_intraday, local_days, resample
from shared.marketdata.series import Columns

NEW_YORK = "America/New_York"
AGG = {"open": "first", "high": "max", "low": "min", "close": "last", "volume": "sum"}
# pandas' rule for each target; 1w is Monday..Sunday labelled by its Monday, 1mo by its first day.
RULES: dict[str, tuple[str, dict[str, str]]] = {
    "5m": ("5min", {}),
    "15m": ("15min", {}),
    "30m": ("30min", {}),
    "1h": ("1h", {}),
    "1d": ("1D", {}),
    "1w": ("W-MON", {"label": "left", "closed": "left"}),
    "1mo": ("MS", {}),
}


def _ts(text: str) -> int:
    return int(pd.Timestamp(text, tz="UTC").timestamp())


def _bars(ts: np.ndarray, seed: int, integer_volume: bool = True) -> Columns:
    """Random OHLCV bars at ``ts`` (a random walk; integer volumes sum exactly in any order)."""
    rng = np.random.default_rng(seed)
    close = 100 + np.cumsum(rng.normal(0, 0.1, len(ts)))
    open_ = close + rng.normal(0, 0.05, len(ts))
    high = np.maximum(open_, close) + rng.random(len(ts))
    low = np.minimum(open_, close) - rng.random(len(ts))
    volume = rng.integers(0, 5000, len(ts)).astype(float) if integer_volume else rng.random(len(ts)) * 1000
    return Columns(ts.astype(np.int64), open_, high, low, close, volume)


def _grid(start: str, end: str, step: int, tz: str, seed: int) -> np.ndarray:
    """Every ``step`` seconds in [start, end) UTC with gaps: no Saturdays (local), a few whole weekdays, and about
    a quarter of the remaining bars missing. Sundays stay, so the US DST changes (Sunday 2:00) have bars."""
    rng = np.random.default_rng(seed)
    ts = np.arange(_ts(start), _ts(end), step, dtype=np.int64)
    local = pd.to_datetime(ts, unit="s", utc=True).tz_convert(tz)
    dates = local.normalize().tz_localize(None).as_unit("s").asi8 // 86_400
    dropped_days = rng.choice(np.unique(dates), size=3, replace=False)
    keep = (local.day_of_week != 5) & ~np.isin(dates, dropped_days) & (rng.random(len(ts)) > 0.25)
    return ts[keep]


def _pandas(columns: Columns, target: str, tz: str) -> Columns:
    """pandas' resample of the same bars, empty buckets dropped, labelled as :func:`resample` labels them."""
    index = pd.to_datetime(columns.ts, unit="s", utc=True).tz_convert(tz)
    frame = pd.DataFrame({name: getattr(columns, name) for name in AGG}, index=index)
    rule, options = RULES[target]
    out = frame.resample(rule, **options).agg(AGG).dropna(subset=["open"])
    labels = out.index if is_intraday(target) else out.index.tz_localize(None)  # an instant, or a local date
    ts = labels.as_unit("s").asi8
    return Columns(ts.astype(np.int64), *(out[name].to_numpy(np.float64) for name in AGG))


def _assert_same(got: Columns, want: Columns, exact_volume: bool = True) -> None:
    assert got.ts.dtype == np.int64 and np.array_equal(got.ts, want.ts)
    for name in ("open", "high", "low", "close"):
        values = getattr(got, name)
        assert values.dtype == np.float64 and values.flags.c_contiguous
        assert np.array_equal(values.view(np.int64), getattr(want, name).view(np.int64)), name
    if exact_volume:
        assert np.array_equal(got.volume.view(np.int64), want.volume.view(np.int64))
    else:
        np.testing.assert_allclose(got.volume, want.volume, rtol=1e-12, atol=0)


# Three weeks around each US DST change of 2024 (10 March, 3 November) in one series, months apart.
MINUTES_NY = np.r_[
    _grid("2024-02-26", "2024-03-18", 60, NEW_YORK, 1), _grid("2024-10-21", "2024-11-11", 60, NEW_YORK, 2)
]


@pytest.mark.parametrize("target", ["5m", "15m", "30m", "1h", "1d", "1w", "1mo"])
def test_minutes_across_dst_match_pandas(target: str) -> None:
    bars = _bars(MINUTES_NY, seed=3)
    got = resample(bars, "1m", target, NEW_YORK)
    _assert_same(got, _pandas(bars, target, NEW_YORK))
    assert np.all(np.diff(got.ts) > 0)


def test_fractional_volumes_sum_within_rounding() -> None:
    bars = _bars(MINUTES_NY, seed=4, integer_volume=False)
    for target in ("1h", "1d"):
        _assert_same(resample(bars, "1m", target, NEW_YORK), _pandas(bars, target, NEW_YORK), exact_volume=False)


@pytest.mark.parametrize(("source", "step", "target"), [("5m", 300, "1h"), ("30m", 1800, "1h"), ("1h", 3600, "1d")])
def test_coarser_sources_match_pandas(source: str, step: int, target: str) -> None:
    bars = _bars(_grid("2024-10-01", "2024-11-30", step, NEW_YORK, 5), seed=6)
    _assert_same(resample(bars, source, target, NEW_YORK), _pandas(bars, target, NEW_YORK))


@pytest.mark.parametrize("target", ["1w", "1mo"])
def test_daily_bars_to_weeks_and_months_match_pandas(target: str) -> None:
    days = np.flatnonzero(np.random.default_rng(7).random(800) > 0.35) + 19_000  # 2022-01-08 on, gaps of days
    bars = _bars(days * 86_400, seed=8)
    got = resample(bars, "1d", target, NEW_YORK)
    _assert_same(got, _pandas(bars, target, "UTC"))  # daily ts are dates: the zone plays no part
    _assert_same(resample(bars, "1d", target, "Asia/Tokyo"), got)


@pytest.mark.parametrize("tz", ["Asia/Tokyo", "UTC", "Asia/Kathmandu"])
@pytest.mark.parametrize("target", ["15m", "1h", "1d", "1w"])
def test_zones_without_dst_match_pandas(tz: str, target: str) -> None:
    bars = _bars(_grid("2024-03-01", "2024-03-29", 60, tz, 9), seed=10)
    _assert_same(resample(bars, "1m", target, tz), _pandas(bars, target, tz))


def test_autumn_repeated_hour_is_two_buckets_and_spring_day_is_23_hours() -> None:
    fall = _bars(np.arange(_ts("2024-11-03 04:00"), _ts("2024-11-03 08:00"), 60), seed=11)  # 0:00 EDT .. 2:59 EST
    hours = resample(fall, "1m", "1h", NEW_YORK)
    # 0:00 EDT, 1:00 EDT, then 1:00 EST and 2:00 EST: the repeated local hour is a bucket of its own.
    assert hours.ts.tolist() == [_ts(f"2024-11-03 0{h}:00") for h in (4, 5, 6, 7)]
    spring = _bars(np.arange(_ts("2024-03-10 05:00"), _ts("2024-03-11 06:00"), 60), seed=12)  # 3/10 0:00 EST on
    days = resample(spring, "1m", "1d", NEW_YORK)
    assert days.ts.tolist() == [_ts("2024-03-10"), _ts("2024-03-11")]
    assert days.volume[0] == spring.volume[: 23 * 60].sum()  # 10 March had 23 hours in New York


def test_half_hour_dst_zone_keeps_buckets_in_order() -> None:
    bars = _bars(np.arange(_ts("2024-04-05"), _ts("2024-04-09"), 60), seed=13)  # Lord Howe sets clocks back 30 min
    for target in ("1h", "1d"):
        got = resample(bars, "1m", target, "Australia/Lord_Howe")
        assert np.all(np.diff(got.ts) > 0) and got.volume.sum() == bars.volume.sum()


@pytest.mark.parametrize(
    "tz", [NEW_YORK, "Europe/London", "Australia/Lord_Howe", "Africa/Casablanca", "America/Sao_Paulo", "UTC"]
)
def test_local_days_match_pandas(tz: str) -> None:
    ts = np.arange(_ts("2015-01-01"), _ts("2026-01-01"), 1800, dtype=np.int64)
    want = pd.to_datetime(ts, unit="s", utc=True).tz_convert(tz).tz_localize(None).as_unit("s").asi8 // 86_400
    assert np.array_equal(local_days(ts, "30m", tz), want)
    assert np.array_equal(local_days(ts - ts % 86_400, "1d", tz), ts // 86_400)


def test_empty_and_read_only_input() -> None:
    empty = resample(_bars(np.empty(0, np.int64), seed=14), "1m", "1h", NEW_YORK)
    assert len(empty) == 0 and empty.ts.dtype == np.int64 and empty.close.dtype == np.float64
    bars = _bars(MINUTES_NY[:5000], seed=15)
    for array in (bars.ts, bars.open, bars.high, bars.low, bars.close, bars.volume):
        array.flags.writeable = False
    _assert_same(resample(bars, "1m", "1h", NEW_YORK), _pandas(bars, "1h", NEW_YORK))


def test_served_timeframes_and_pairs() -> None:
    assert SERVED_TIMEFRAMES == ("1m", "5m", "15m", "30m", "1h", "1d", "1w", "1mo")
    assert [is_intraday(t) for t in SERVED_TIMEFRAMES] == [True] * 5 + [False] * 3
    assert can_serve("1m", "1mo") and can_serve("5m", "15m") and can_serve("1h", "1d") and can_serve("1d", "1w")
    assert not can_serve("1d", "1d") and not can_serve("1h", "1m") and not can_serve("1w", "1mo")
    with pytest.raises(ValueError, match="unknown timeframe"):
        is_intraday("2h")


@pytest.mark.parametrize(
    ("source", "target"),
    [("1h", "1m"), ("1d", "1h"), ("1h", "1h"), ("1w", "1mo"), ("1m", "2h"), ("2m", "1h"), ("1mo", "1w")],
)
def test_bad_pairs_raise(source: str, target: str) -> None:
    bars = _bars(MINUTES_NY[:10], seed=16)
    assert not can_serve(source, target)
    with pytest.raises(ValueError, match="cannot resample"):
        resample(bars, source, target, NEW_YORK)
