"""Golden tests on intraday bars: the backtesting_py convention against backtesting.py 0.6.6 itself, run in the test.

backtesting.py's hourly EURUSD sample and synthetic 1-minute (a 6.5-hour stock session) and 5-minute (24/7) bars:
every metric backtesting.py reports (rtol 1e-9; its Timedeltas as days, its Timestamps as our ISO UTC strings),
the trade list and the equity curve, as the daily golden tests compare them.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from backtesting.lib import compute_stats

from shared.domain.backtest import Bars, run_backtest
from tests.unit.backtest.conftest import bars_from_frame
from tests.unit.backtest.test_golden_backtesting_py import (
    BollingerReversion,
    BuyAndHold,
    RsiReversion,
    SmaCross,
    SmaCrossLongOnly,
    assert_matches,
    config,
    run_reference,
)


@pytest.fixture(scope="module")
def eurusd() -> pd.DataFrame:
    from backtesting.test import EURUSD

    frame: pd.DataFrame = EURUSD.copy()
    return frame


@pytest.fixture(scope="module")
def eurusd_bars(eurusd: pd.DataFrame) -> Bars:
    return bars_from_frame(eurusd, "1h")


def _frame(close: np.ndarray, index: pd.DatetimeIndex, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    open_ = close * np.exp(rng.normal(0, 0.001, len(close)))
    return pd.DataFrame(
        {
            "Open": np.round(open_, 2),
            "High": np.round(np.maximum(open_, close) * 1.001, 2),
            "Low": np.round(np.minimum(open_, close) * 0.999, 2),
            "Close": np.round(close, 2),
            "Volume": rng.integers(100, 10_000, len(close)).astype(float),
        },
        index=index,
    )


def stock_minutes(days: int, seed: int) -> pd.DataFrame:
    """1-minute bars of a 09:30-16:00 New York session (14:30-21:00 UTC), weekdays only."""
    sessions = pd.bdate_range("2024-03-04", periods=days)
    index = pd.DatetimeIndex(
        np.concatenate([pd.date_range(d + pd.Timedelta("14h30min"), periods=390, freq="min") for d in sessions])
    )
    rng = np.random.default_rng(seed)
    close = 100 * np.exp(np.cumsum(rng.normal(0, 0.0015, len(index))))
    return _frame(close, index, seed + 1)


def crypto_five_minutes(n: int, seed: int) -> pd.DataFrame:
    """5-minute bars around the clock, weekends included (365-day years)."""
    rng = np.random.default_rng(seed)
    close = 100 * np.exp(np.cumsum(rng.normal(0, 0.003, n)))
    return _frame(close, pd.date_range("2024-01-01 00:00", periods=n, freq="5min"), seed + 1)


# --- hourly EURUSD -------------------------------------------------------------------------------------------


def test_eurusd_sma_cross_10_20_matches_backtesting_py(eurusd: pd.DataFrame, eurusd_bars: Bars) -> None:
    reference = run_reference(eurusd, SmaCross, commission=0.0002, exclusive_orders=True)
    result = run_backtest(
        eurusd_bars, config({"name": "dual_sma", "params": {"fast": 10, "slow": 20}}, fee_bps=2, allow_short=True)
    )
    assert_matches(reference, result, intraday=True)
    assert result.metrics["Start"] == "2017-04-19T09:00:00Z"
    assert result.metrics["Periods per Year"] == 252  # hourly data: calendar-day returns, few weekend bars
    assert result.metrics["Duration"] == pytest.approx(294.25, rel=1e-15)  # 294 days 06:00
    assert result.metrics["Avg. Trade Duration"] * 24 == pytest.approx(27)
    assert reference["# Trades"] == 262
    assert (result.trades.size < 0).any()


@pytest.mark.parametrize(("fast", "slow"), [(3, 7), (24, 120)])
def test_eurusd_sma_cross_other_windows(eurusd: pd.DataFrame, eurusd_bars: Bars, fast: int, slow: int) -> None:
    reference = run_reference(eurusd, SmaCross, {"fast": fast, "slow": slow}, commission=0.0002, exclusive_orders=True)
    result = run_backtest(
        eurusd_bars, config({"name": "dual_sma", "params": {"fast": fast, "slow": slow}}, fee_bps=2, allow_short=True)
    )
    assert_matches(reference, result, intraday=True)


def test_eurusd_long_only_half_size_fixed_plus_relative_commission(eurusd: pd.DataFrame, eurusd_bars: Bars) -> None:
    reference = run_reference(
        eurusd,
        SmaCrossLongOnly,
        {"fast": 8, "slow": 30},
        commission=(3.0, 0.0001),
        exclusive_orders=True,
        finalize_trades=True,
        cash=100_000,
    )
    result = run_backtest(
        eurusd_bars,
        config(
            {"name": "dual_sma", "params": {"fast": 8, "slow": 30}},
            fee_bps=1,
            fixed_fee=3.0,
            flatten_at_end=True,
            initial_cash=100_000,
            risk={"model": "fixed_fraction", "params": {"fraction": 0.5}},
        ),
    )
    assert_matches(reference, result, intraday=True)
    assert result.open_position is None


def test_eurusd_rsi_and_bollinger(eurusd: pd.DataFrame, eurusd_bars: Bars) -> None:
    reference = run_reference(eurusd, RsiReversion, commission=0.0001, exclusive_orders=True, finalize_trades=True)
    result = run_backtest(
        eurusd_bars,
        config(
            {"name": "rsi_reversion", "params": {"period": 14, "lower": 30, "upper": 70}},
            fee_bps=1,
            flatten_at_end=True,
            risk={"model": "fixed_fraction", "params": {"fraction": 0.5}},
        ),
    )
    assert len(result.trades) > 5
    assert_matches(reference, result, intraday=True)
    reference = run_reference(eurusd, BollingerReversion, commission=0.0001, exclusive_orders=True)
    result = run_backtest(
        eurusd_bars,
        config({"name": "bollinger_reversion", "params": {"period": 20, "k": 2.0}}, fee_bps=1, allow_short=True),
    )
    assert len(result.trades) > 10
    assert_matches(reference, result, intraday=True)


def test_eurusd_risk_free_rate_matches_compute_stats(eurusd: pd.DataFrame, eurusd_bars: Bars) -> None:
    base = run_reference(eurusd, SmaCross, commission=0.0002, exclusive_orders=True)
    reference = compute_stats(stats=base, data=eurusd, risk_free_rate=0.03)
    result = run_backtest(
        eurusd_bars,
        config(
            {"name": "dual_sma", "params": {"fast": 10, "slow": 20}}, fee_bps=2, allow_short=True, risk_free_rate=0.03
        ),
    )
    assert_matches(reference, result, intraday=True)


def test_eurusd_open_position_and_json(eurusd_bars: Bars) -> None:
    result = run_backtest(
        eurusd_bars, config({"name": "dual_sma", "params": {"fast": 10, "slow": 20}}, fee_bps=2, allow_short=True)
    )
    doc = result.to_dict()
    assert doc["equity_curve"]["dates"][:2] == ["2017-04-19T09:00:00Z", "2017-04-19T10:00:00Z"]
    assert len(doc["equity_curve"]["dates"]) == len(eurusd_bars)
    assert result.open_position is not None
    assert result.open_position.entry_date == doc["trades"][-1]["exit_date"]
    assert result.open_position.entry_date.endswith("Z") and "T" in result.open_position.entry_date


# --- synthetic 1-minute and 5-minute bars --------------------------------------------------------------------


@pytest.mark.parametrize("seed", [1, 2])
def test_one_minute_stock_session(seed: int) -> None:
    data = stock_minutes(12, seed)
    reference = run_reference(data, SmaCross, {"fast": 10, "slow": 30}, commission=0.0005, exclusive_orders=True)
    result = run_backtest(
        bars_from_frame(data, "1m"),
        config({"name": "dual_sma", "params": {"fast": 10, "slow": 30}}, fee_bps=5, allow_short=True),
    )
    assert result.metrics["Periods per Year"] == 252
    assert len(result.trades) > 50
    assert_matches(reference, result, intraday=True)


def test_one_minute_long_only_finalized() -> None:
    data = stock_minutes(8, 3)
    reference = run_reference(
        data, SmaCrossLongOnly, {"fast": 15, "slow": 60}, commission=0.001, exclusive_orders=True, finalize_trades=True
    )
    result = run_backtest(
        bars_from_frame(data, "1m"),
        config(
            {"name": "dual_sma", "params": {"fast": 15, "slow": 60}},
            fee_bps=10,
            flatten_at_end=True,
            risk={"model": "fixed_fraction", "params": {"fraction": 0.5}},
        ),
    )
    assert_matches(reference, result, intraday=True)


@pytest.mark.parametrize("seed", [4, 5])
def test_five_minutes_around_the_clock(seed: int) -> None:
    data = crypto_five_minutes(6000, seed)
    reference = run_reference(data, SmaCross, {"fast": 12, "slow": 48}, commission=0.001, exclusive_orders=True)
    result = run_backtest(
        bars_from_frame(data, "5m"),
        config({"name": "dual_sma", "params": {"fast": 12, "slow": 48}}, fee_bps=10, allow_short=True),
    )
    assert result.metrics["Periods per Year"] == 365
    assert_matches(reference, result, intraday=True)


def test_five_minutes_buy_and_hold() -> None:
    data = crypto_five_minutes(3000, 6)
    reference = run_reference(data, BuyAndHold, commission=0.002, exclusive_orders=True, finalize_trades=True)
    result = run_backtest(
        bars_from_frame(data, "5m"), config({"name": "buy_and_hold"}, fee_bps=20, flatten_at_end=True)
    )
    assert len(result.trades) == 1
    assert_matches(reference, result, intraday=True)
