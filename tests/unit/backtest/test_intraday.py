"""Intraday bars through shared.domain: timeframes, dates as text, range cuts, annualisation, grid, validation."""

from __future__ import annotations

import datetime as dt
import math

import numpy as np
import pandas as pd
import pytest

from shared.domain import robustness as v
from shared.domain.backtest import BacktestConfig, Bars, BarsError, run_backtest
from shared.domain.backtest.bars import format_bar_dates
from shared.domain.backtest.grid import SUMMARY_NAMES, all_pairs, run_dual_sma_grid
from shared.domain.backtest.metrics import period_bins, periods_per_year
from shared.domain.backtest.risk import VolatilityTargetParams, decision_fractions
from shared.domain.indicators.engine import realized_volatility
from tests.unit.backtest.conftest import bars_from_frame, make_bars
from tests.unit.backtest.test_golden_intraday import crypto_five_minutes, stock_minutes


def hourly(n: int, start: str = "2024-01-01T00:00:00", close: np.ndarray | None = None) -> Bars:
    c = np.linspace(100, 110, n) if close is None else close
    dates = np.datetime64(start, "s") + np.arange(n) * np.timedelta64(1, "h")
    return Bars.from_arrays(open=c, high=c * 1.01, low=c * 0.99, close=c, volume=np.full(n, 1e4), dates=dates,
                            timeframe="1h")  # fmt: skip


def dual_sma(fast: int = 5, slow: int = 20, **body: object) -> BacktestConfig:
    return BacktestConfig.model_validate(
        {"symbols": ["X"], "strategy": {"name": "dual_sma", "params": {"fast": fast, "slow": slow}}, **body}
    )


# --- Bars ----------------------------------------------------------------------------------------------------


def test_daily_bars_are_unchanged_and_reject_two_bars_in_a_day() -> None:
    bars = make_bars([1.0, 2.0, 3.0])
    assert bars.timeframe == "1d" and bars.dates.dtype == np.dtype("datetime64[D]") and not bars.intraday
    with pytest.raises(BarsError, match=r"dates\[1\] \(2024-01-01\): dates must be strictly increasing"):
        Bars.from_arrays(open=[1, 1], high=[1, 1], low=[1, 1], close=[1, 1], volume=[0, 0],
                         dates=["2024-01-01T09:00", "2024-01-01T10:00"])  # fmt: skip


def test_intraday_bars_are_utc_instants() -> None:
    dates: list[str | dt.datetime] = [
        "2024-01-01T09:00:00",
        "2024-01-01T10:00:00Z",
        dt.datetime(2024, 1, 1, 12, tzinfo=dt.UTC),
    ]
    bars = Bars.from_arrays(open=[1, 1, 1], high=[1, 1, 1], low=[1, 1, 1], close=[1, 1, 1], volume=[0, 0, 0],
                            dates=dates, timeframe="1h")  # fmt: skip
    assert bars.dates.dtype == np.dtype("datetime64[s]") and bars.intraday
    assert format_bar_dates(bars.dates) == ["2024-01-01T09:00:00Z", "2024-01-01T10:00:00Z", "2024-01-01T12:00:00Z"]
    aware = dt.datetime(2024, 1, 1, 12, tzinfo=dt.timezone(dt.timedelta(hours=-5)))  # 17:00 UTC
    one = Bars.from_arrays(open=[1], high=[1], low=[1], close=[1], volume=[0], dates=[aware], timeframe="5m")
    assert format_bar_dates(one.dates[0]) == "2024-01-01T17:00:00Z"
    frame = pd.DataFrame({"c": [1.0, 1.0]}, index=pd.date_range("2024-01-01 09:30", periods=2, freq="min"))
    minutes = Bars.from_arrays(open=frame.c, high=frame.c, low=frame.c, close=frame.c, volume=frame.c,
                               dates=frame.index.values, timeframe="1m")  # fmt: skip
    assert minutes.dates[1] == np.datetime64("2024-01-01T09:31")


def test_intraday_errors_name_the_array_and_the_bar() -> None:
    dates = ["2024-01-02T09:00", "2024-01-02T10:00", "2024-01-02T10:00"]
    with pytest.raises(BarsError, match=r"dates\[2\] \(2024-01-02T10:00:00Z\): dates must be strictly increasing"):
        Bars.from_arrays(open=[1] * 3, high=[1] * 3, low=[1] * 3, close=[1] * 3, volume=[0] * 3, dates=dates,
                         timeframe="15m")  # fmt: skip
    with pytest.raises(BarsError, match=r"close\[1\] \(2024-01-02T10:00:00Z\): .*nan.* is not finite and > 0"):
        Bars.from_arrays(open=[1] * 2, high=[1] * 2, low=[1] * 2, close=[1, math.nan], volume=[0] * 2,
                         dates=dates[:2], timeframe="30m")  # fmt: skip
    with pytest.raises(BarsError, match="timeframe: '2h' is not one of 1m, 5m, 15m, 30m, 1h, 1d, 1w, 1mo"):
        Bars.from_arrays(open=[1], high=[1], low=[1], close=[1], volume=[0], dates=dates[:1], timeframe="2h")
    with pytest.raises(BarsError, match=r"1h bars need datetime64\[s\] dates"):
        Bars(open=np.ones(1), high=np.ones(1), low=np.ones(1), close=np.ones(1), volume=np.ones(1),
             dates=np.array(["2024-01-01"], dtype="datetime64[D]"), timeframe="1h")  # fmt: skip


def test_format_bar_dates() -> None:
    days = np.array(["2024-01-01", "2024-12-31"], dtype="datetime64[D]")
    assert format_bar_dates(days) == ["2024-01-01", "2024-12-31"] == [str(d) for d in days]
    assert format_bar_dates(days[1]) == "2024-12-31"
    assert format_bar_dates(np.datetime64("2024-01-01T09:30:00.123456789", "ns")) == "2024-01-01T09:30:00Z"


def test_between_date_bounds_cover_whole_utc_days() -> None:
    bars = hourly(24 * 5)  # 2024-01-01 00:00 .. 2024-01-05 23:00
    cut = bars.between(dt.date(2024, 1, 2), dt.date(2024, 1, 3))
    assert len(cut) == 48 and cut.timeframe == "1h"
    assert format_bar_dates(cut.dates[[0, -1]]) == ["2024-01-02T00:00:00Z", "2024-01-03T23:00:00Z"]
    exact = bars.between(dt.datetime(2024, 1, 2, 10), dt.datetime(2024, 1, 2, 12))
    assert format_bar_dates(exact.dates) == ["2024-01-02T10:00:00Z", "2024-01-02T11:00:00Z", "2024-01-02T12:00:00Z"]
    assert len(bars.between(None, dt.date(2024, 1, 1))) == 24
    with pytest.raises(BarsError, match="no bars between"):
        bars.between(dt.date(2024, 2, 1), None)


def test_bars_per_day() -> None:
    assert make_bars([1.0, 2.0]).bars_per_day == 1.0
    assert bars_from_frame(stock_minutes(3, 0), "1m").bars_per_day == 390
    assert hourly(24 * 7 + 5).bars_per_day == 24


# --- metrics and annualisation -------------------------------------------------------------------------------


def test_periods_per_year_and_day_bins_of_instants() -> None:
    weekdays = bars_from_frame(stock_minutes(10, 0), "1m").dates
    assert periods_per_year(weekdays) == (252, 0)
    assert np.array_equal(period_bins(weekdays, 0), np.arange(389, 3900, 390))
    assert periods_per_year(bars_from_frame(crypto_five_minutes(3000, 0), "5m").dates) == (365, 0)


def test_daily_result_formats_are_unchanged() -> None:
    result = run_backtest(make_bars(np.r_[np.linspace(10, 20, 30), np.linspace(20, 10, 30)]), dual_sma(3, 10))
    doc = result.to_dict()
    assert doc["equity_curve"]["dates"][:2] == ["2024-01-01", "2024-01-02"]
    assert doc["metrics"]["Start"] == "2024-01-01" and doc["metrics"]["Duration"] == 59.0
    assert all(len(t["entry_date"]) == 10 for t in doc["trades"])


def test_volatility_target_annualises_by_bars_per_day() -> None:
    rng = np.random.default_rng(1)
    close = 100 * np.exp(np.cumsum(rng.normal(0, 0.002, 24 * 30)))
    params = VolatilityTargetParams(lookback=48, target_volatility=0.01)
    for bars, per_year in ((hourly(len(close), close=close), 252 * 24), (make_bars(close), 252)):
        expected = np.clip(0.01 / realized_volatility(close, 48, per_year), 0, 1)
        expected[:48] = 0
        assert 0 < expected[48:].max() < 1
        np.testing.assert_array_equal(decision_fractions("volatility_target", params, bars), expected)


def test_grid_cells_equal_single_runs_on_hourly_bars() -> None:
    from backtesting.test import EURUSD

    bars = bars_from_frame(EURUSD, "1h")
    config = dual_sma(execution={"convention": "backtesting_py", "fee_bps": 2, "allow_short": True})
    fast, slow = all_pairs(2, 30)
    grid = run_dual_sma_grid(bars, fast, slow, config)
    for k in np.random.default_rng(0).choice(len(fast), 8, replace=False):
        single = run_backtest(bars, dual_sma(int(fast[k]), int(slow[k]), execution=config.execution.model_dump()))
        for j, name in enumerate(SUMMARY_NAMES):
            assert grid.summary[k, j] == pytest.approx(single.metrics[name], rel=1e-9, nan_ok=True), (k, name)


# --- validation on intraday bars -----------------------------------------------------------------------------


def test_portfolio_curve_takes_an_intraday_curve_at_its_last_value_per_day() -> None:
    bars = hourly(24 * 3 + 2)
    equity = np.arange(len(bars), dtype=float)
    daily = (np.array(["2024-01-01", "2024-01-03", "2024-01-04"], dtype="datetime64[D]"), np.array([5.0, 6.0, 7.0]))
    days, total = v.portfolio_curve([(bars.dates, equity), daily], 1.0)
    assert format_bar_dates(days) == ["2024-01-01", "2024-01-02", "2024-01-03", "2024-01-04"]
    np.testing.assert_array_equal(total, [23 + 5, 47 + 5, 71 + 6, 73 + 7])


def test_validation_runs_on_bars_from_frame() -> None:
    symbols = {s: bars_from_frame(stock_minutes(15, seed), "1m") for seed, s in enumerate(("AAA", "BBB"))}
    config = BacktestConfig.model_validate(
        {"symbols": ["AAA", "BBB"], "strategy": {"name": "dual_sma", "params": {"fast": 10, "slow": 40}}, "seed": 3}
    )
    spec = v.ValidationSpec.model_validate(
        {"permutation": {"n": 10}, "bootstrap": {"n": 10, "block": 3, "chunk": 5}, "monte_carlo": {"n": 10},
         "walk_forward": {"in_sample": 1200, "out_of_sample": 600, "fast": [5, 10], "slow": [30, 60], "chunk": 2},
         "chunk": 2}
    )  # fmt: skip
    result = v.validate_in_process(symbols, config, spec)
    assert all(block["complete"] for block in result["methods"].values())
    windows = result["methods"]["walk_forward"]["symbols"]["AAA"]["windows"]
    assert windows[0]["in_sample"] == ["2024-03-04T14:30:00Z", "2024-03-07T14:59:00Z"]
    permuted = v.permuted_bars(symbols["AAA"], np.random.default_rng(0))
    assert permuted.timeframe == "1m" and np.array_equal(permuted.dates, symbols["AAA"].dates)
