"""Golden tests: the backtesting_py convention against backtesting.py 0.6.6 itself, run in the test.

Each case runs the reference library on the same bars and compares every metric it reports (rtol 1e-9), the
trade list (bars, sizes and prices exactly; PnL, returns and commissions to rtol 1e-9) and the equity curve.
backtesting.py is AGPL: it is a test-only dependency and never imported by product code.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import pandas as pd
import pytest
from backtesting import Backtest, Strategy
from backtesting.lib import compute_stats, crossover
from backtesting.test import SMA

from shared.domain.backtest import BacktestConfig, Bars, run_backtest
from shared.domain.backtest.engine import BacktestResult
from shared.domain.backtest.strategies import bollinger_bands, donchian_upper_lower
from shared.domain.indicators.engine import rsi
from tests.unit.backtest.conftest import bars_from_frame

RTOL = 1e-9


def run_reference(data: pd.DataFrame, strategy: type, params: dict[str, Any] | None = None, **kwargs: Any) -> pd.Series:
    """backtesting.py's run: ``kwargs`` configure the Backtest, ``params`` the strategy."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Backtest(data, strategy, **kwargs).run(**(params or {}))


def config(strategy: dict[str, Any], **execution: Any) -> BacktestConfig:
    risk = execution.pop("risk", {"model": "fixed_fraction"})
    extra = {k: execution.pop(k) for k in ("risk_free_rate", "initial_cash") if k in execution}
    return BacktestConfig.model_validate(
        {
            "symbols": ["TEST"],
            "strategy": strategy,
            "risk": risk,
            "execution": {"convention": "backtesting_py", **execution},
            **extra,
        }
    )


def _as_comparable(value: Any, intraday: bool = False) -> Any:
    if isinstance(value, pd.Timestamp):
        return value.strftime("%Y-%m-%dT%H:%M:%SZ") if intraday else str(value.date())
    if isinstance(value, pd.Timedelta):
        return value / pd.Timedelta(days=1)
    return value


def assert_matches(reference: pd.Series, result: BacktestResult, *, intraday: bool = False) -> None:
    """Every metric backtesting.py reports, the trade list and the equity curve (intraday: instants to the second,
    shown as ISO UTC timestamps)."""
    compared = 0
    for key, ref_value in reference.items():
        if str(key).startswith("_"):
            continue
        assert key in result.metrics, f"metric {key!r} missing"
        expected = _as_comparable(ref_value, intraday)
        actual = result.metrics[key]
        if isinstance(expected, str):
            assert actual == expected, key
        elif expected is None or (isinstance(expected, float) and math.isnan(expected)):
            assert isinstance(actual, float) and math.isnan(actual), f"{key}: {actual} != NaN"
        else:
            assert actual == pytest.approx(float(expected), rel=RTOL, abs=0), key
        compared += 1
    assert compared >= 30

    unit = "datetime64[s]" if intraday else "datetime64[D]"
    trades = reference["_trades"]
    assert len(result.trades) == len(trades)
    np.testing.assert_array_equal(result.trades.size, trades["Size"].to_numpy(float))
    np.testing.assert_array_equal(result.trades.entry_bar, trades["EntryBar"].to_numpy())
    np.testing.assert_array_equal(result.trades.exit_bar, trades["ExitBar"].to_numpy())
    np.testing.assert_array_equal(result.trades.entry_price, trades["EntryPrice"].to_numpy(float))
    np.testing.assert_array_equal(result.trades.exit_price, trades["ExitPrice"].to_numpy(float))
    np.testing.assert_allclose(result.trades.pnl, trades["PnL"].to_numpy(float), rtol=RTOL)
    np.testing.assert_allclose(result.trades.return_pct, trades["ReturnPct"].to_numpy(float), rtol=RTOL)
    np.testing.assert_allclose(result.trades.commission, trades["Commission"].to_numpy(float), rtol=RTOL)
    np.testing.assert_array_equal(result.trades.entry_date, trades["EntryTime"].to_numpy().astype(unit))
    np.testing.assert_array_equal(result.trades.exit_date, trades["ExitTime"].to_numpy().astype(unit))
    records = result.trades.to_records()
    assert [r["entry_date"] for r in records] == [_as_comparable(t, intraday) for t in trades["EntryTime"]]

    curve = reference["_equity_curve"]
    np.testing.assert_allclose(result.equity, curve["Equity"].to_numpy(float), rtol=RTOL)
    np.testing.assert_allclose(result.drawdown, curve["DrawdownPct"].to_numpy(float), rtol=RTOL, atol=1e-15)
    np.testing.assert_array_equal(result.dates, curve.index.to_numpy().astype(unit))


# --- reference strategies (backtesting.py side) ---------------------------------------------------------------


class SmaCross(Strategy):
    fast = 10
    slow = 20

    def init(self) -> None:
        self.ma1 = self.I(SMA, self.data.Close, self.fast)
        self.ma2 = self.I(SMA, self.data.Close, self.slow)

    def next(self) -> None:
        if crossover(self.ma1, self.ma2):
            self.buy()
        elif crossover(self.ma2, self.ma1):
            self.sell()


class SmaCrossLongOnly(SmaCross):
    size = 0.5

    def next(self) -> None:
        if crossover(self.ma1, self.ma2):
            self.buy(size=self.size)
        elif crossover(self.ma2, self.ma1):
            self.position.close()


class RsiReversion(Strategy):
    period = 14
    lower = 30.0
    upper = 70.0
    size = 0.5
    shorts = False

    def init(self) -> None:
        self.rsi = self.I(lambda c: rsi(np.asarray(c, float), self.period), self.data.Close)

    def next(self) -> None:
        if self.rsi[-1] < self.lower and not self.position.is_long:
            self.buy(size=self.size)
        elif self.rsi[-1] > self.upper and not self.position.is_short:
            if self.shorts:
                self.sell(size=self.size)
            else:
                self.position.close()


class DonchianBreakout(Strategy):
    period = 20

    def init(self) -> None:
        bars = bars_from_frame(self.data.df)
        upper, lower = donchian_upper_lower(bars, self.period)
        self.upper = self.I(lambda: upper)
        self.lower = self.I(lambda: lower)

    def next(self) -> None:
        close = self.data.Close[-1]
        if close > self.upper[-1] and not self.position.is_long:
            self.buy()
        elif close < self.lower[-1] and not self.position.is_short:
            self.sell()


class BollingerReversion(Strategy):
    period = 20
    k = 2.0

    def init(self) -> None:
        lo, mid, hi = bollinger_bands(np.asarray(self.data.Close, float), self.period, self.k)
        self.lo = self.I(lambda: lo)
        self.mid = self.I(lambda: mid)
        self.hi = self.I(lambda: hi)

    def next(self) -> None:
        close = self.data.Close[-1]
        if close < self.lo[-1] and not self.position.is_long:
            self.buy()
        elif close > self.hi[-1] and not self.position.is_short:
            self.sell()
        elif (self.position.is_long and close >= self.mid[-1]) or (self.position.is_short and close <= self.mid[-1]):
            self.position.close()


class BuyAndHold(Strategy):
    def init(self) -> None:
        pass

    def next(self) -> None:
        if not self.position:
            self.buy()


# --- the headline case -------------------------------------------------------------------------------


def test_goog_sma_cross_10_20_matches_backtesting_py(goog: pd.DataFrame, goog_bars: Bars) -> None:
    reference = run_reference(goog, SmaCross, commission=0.002, exclusive_orders=True)
    result = run_backtest(
        goog_bars, config({"name": "dual_sma", "params": {"fast": 10, "slow": 20}}, fee_bps=20, allow_short=True)
    )
    assert_matches(reference, result)
    # the figures quoted in the issue, as backtesting.py 0.6.6 prints them
    assert reference["# Trades"] == result.metrics["# Trades"] == 93
    assert round(result.metrics["Equity Final [$]"], 2) == 56263.52  # type: ignore[arg-type]
    assert round(result.metrics["Return [%]"], 2) == 462.64  # type: ignore[arg-type]
    assert round(result.metrics["Sharpe Ratio"], 4) == 0.6007  # type: ignore[arg-type]
    assert round(result.metrics["Max. Drawdown [%]"], 2) == -33.93  # type: ignore[arg-type]
    assert (result.trades.size < 0).any(), "the case includes short trades"
    assert result.open_position is not None  # the last trade is still open, as in backtesting.py


@pytest.mark.parametrize(("fast", "slow"), [(2, 3), (5, 30), (20, 50), (37, 99)])
def test_goog_sma_cross_other_windows(goog: pd.DataFrame, goog_bars: Bars, fast: int, slow: int) -> None:
    reference = run_reference(goog, SmaCross, {"fast": fast, "slow": slow}, commission=0.002, exclusive_orders=True)
    result = run_backtest(
        goog_bars, config({"name": "dual_sma", "params": {"fast": fast, "slow": slow}}, fee_bps=20, allow_short=True)
    )
    assert_matches(reference, result)


def test_long_only_half_size_fixed_plus_relative_commission_finalized(goog: pd.DataFrame, goog_bars: Bars) -> None:
    reference = run_reference(
        goog,
        SmaCrossLongOnly,
        {"fast": 8, "slow": 30},
        commission=(3.0, 0.001),
        exclusive_orders=True,
        finalize_trades=True,
    )
    result = run_backtest(
        goog_bars,
        config(
            {"name": "dual_sma", "params": {"fast": 8, "slow": 30}},
            fee_bps=10,
            fixed_fee=3.0,
            flatten_at_end=True,
            risk={"model": "fixed_fraction", "params": {"fraction": 0.5}},
        ),
    )
    assert_matches(reference, result)
    assert (result.trades.size > 0).all()
    assert result.open_position is None


def test_rsi_reversion_long_only(goog: pd.DataFrame, goog_bars: Bars) -> None:
    reference = run_reference(goog, RsiReversion, commission=0.001, exclusive_orders=True, finalize_trades=True)
    result = run_backtest(
        goog_bars,
        config(
            {"name": "rsi_reversion", "params": {"period": 14, "lower": 30, "upper": 70}},
            fee_bps=10,
            flatten_at_end=True,
            risk={"model": "fixed_fraction", "params": {"fraction": 0.5}},
        ),
    )
    assert len(result.trades) > 5
    assert_matches(reference, result)


def test_rsi_reversion_long_short(goog: pd.DataFrame, goog_bars: Bars) -> None:
    reference = run_reference(
        goog,
        RsiReversion,
        {"shorts": True, "size": 0.9, "lower": 35.0, "upper": 65.0},
        commission=0.001,
        exclusive_orders=True,
    )
    result = run_backtest(
        goog_bars,
        config(
            {"name": "rsi_reversion", "params": {"period": 14, "lower": 35, "upper": 65}},
            fee_bps=10,
            allow_short=True,
            risk={"model": "fixed_fraction", "params": {"fraction": 0.9}},
        ),
    )
    assert (result.trades.size < 0).any() and (result.trades.size > 0).any()
    assert_matches(reference, result)


def test_donchian_breakout_long_short(goog: pd.DataFrame, goog_bars: Bars) -> None:
    reference = run_reference(goog, DonchianBreakout, commission=0.001, exclusive_orders=True)
    result = run_backtest(
        goog_bars,
        config({"name": "donchian_breakout", "params": {"period": 20}}, fee_bps=10, allow_short=True),
    )
    assert (result.trades.size < 0).any() and (result.trades.size > 0).any()
    assert_matches(reference, result)


def test_bollinger_reversion_with_mid_band_exits(goog: pd.DataFrame, goog_bars: Bars) -> None:
    reference = run_reference(goog, BollingerReversion, commission=0.0005, exclusive_orders=True, finalize_trades=True)
    result = run_backtest(
        goog_bars,
        config(
            {"name": "bollinger_reversion", "params": {"period": 20, "k": 2.0}},
            fee_bps=5,
            allow_short=True,
            flatten_at_end=True,
        ),
    )
    assert len(result.trades) > 10
    assert_matches(reference, result)


def test_buy_and_hold(goog: pd.DataFrame, goog_bars: Bars) -> None:
    reference = run_reference(goog, BuyAndHold, commission=0.002, exclusive_orders=True, finalize_trades=True)
    result = run_backtest(goog_bars, config({"name": "buy_and_hold"}, fee_bps=20, flatten_at_end=True))
    assert len(result.trades) == 1
    assert_matches(reference, result)


def test_risk_free_rate_matches_compute_stats(goog: pd.DataFrame, goog_bars: Bars) -> None:
    base = run_reference(goog, SmaCross, commission=0.002, exclusive_orders=True)
    reference = compute_stats(stats=base, data=goog, risk_free_rate=0.03)
    result = run_backtest(
        goog_bars,
        config(
            {"name": "dual_sma", "params": {"fast": 10, "slow": 20}}, fee_bps=20, allow_short=True, risk_free_rate=0.03
        ),
    )
    assert reference["Sharpe Ratio"] != base["Sharpe Ratio"]
    assert_matches(reference, result)


# --- synthetic data: weekends (365-day years), weekly bars, an account that goes bust ------------------------


def _random_walk(n: int, seed: int, freq: str, drift: float = 0.0, vol: float = 0.02) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    close = 100 * np.exp(np.cumsum(rng.normal(drift, vol, n)))
    open_ = close * np.exp(rng.normal(0, vol / 3, n))
    index = pd.date_range("2019-01-07", periods=n, freq=freq)
    return pd.DataFrame(
        {
            "Open": np.round(open_, 2),
            "High": np.round(np.maximum(open_, close) * 1.01, 2),
            "Low": np.round(np.minimum(open_, close) * 0.99, 2),
            "Close": np.round(close, 2),
            "Volume": rng.integers(1_000, 100_000, n).astype(float),
        },
        index=index,
    )


@pytest.mark.parametrize(("freq", "seed"), [("D", 1), ("D", 2), ("W", 3), ("B", 4)])
def test_synthetic_calendars(freq: str, seed: int) -> None:
    data = _random_walk(900, seed, freq)
    reference = run_reference(data, SmaCross, commission=0.001, exclusive_orders=True, finalize_trades=True)
    result = run_backtest(
        bars_from_frame(data),
        config(
            {"name": "dual_sma", "params": {"fast": 10, "slow": 20}}, fee_bps=10, allow_short=True, flatten_at_end=True
        ),
    )
    expected_periods = {"D": 365, "W": 52, "B": 252}[freq]
    assert result.metrics["Periods per Year"] == expected_periods
    assert_matches(reference, result)


def test_short_squeeze_bust_matches() -> None:
    """A short into a price explosion: equity reaches zero, the account is liquidated and stops."""
    close = np.r_[np.linspace(90, 100, 15), np.linspace(100, 80, 25), np.full(20, 250.0)]
    data = pd.DataFrame(
        {"Open": close, "High": close * 1.001, "Low": close * 0.999, "Close": close, "Volume": 1e5},
        index=pd.date_range("2020-01-01", periods=len(close), freq="D"),
    )
    reference = run_reference(data, SmaCross, {"fast": 3, "slow": 10}, commission=0.001, exclusive_orders=True)
    result = run_backtest(
        bars_from_frame(data),
        config({"name": "dual_sma", "params": {"fast": 3, "slow": 10}}, fee_bps=10, allow_short=True),
    )
    assert result.orders["bust_bar"] >= 0
    assert result.metrics["Equity Final [$]"] == 0
    assert_matches(reference, result)
