"""Causality: a decision on bar t's close fills no earlier than bar t+1, and the future never changes the past."""

from __future__ import annotations

import numpy as np
import pytest

from shared.domain.backtest import BacktestConfig, Bars, run_backtest
from shared.domain.backtest.engine import run_events
from shared.domain.backtest.strategies import FLAT, LONG, REGISTRY
from tests.unit.backtest.conftest import make_bars


def _alternating_bars(n: int = 200) -> Bars:
    """Bars that alternate: up (+2 %) then down (-2 %) from open to close, next open = previous close."""
    close = np.empty(n)
    open_ = np.empty(n)
    price = 100.0
    for t in range(n):
        open_[t] = price
        price *= 1.02 if t % 2 == 0 else 0.98
        close[t] = price
    return make_bars(close=close, open_=open_)


def _config(fill: str) -> BacktestConfig:
    return BacktestConfig.model_validate(
        {"symbols": ["T"], "strategy": {"name": "buy_and_hold"}, "execution": {"fill": fill, "fractional_units": True}}
    )


@pytest.mark.parametrize("fill", ["next_open", "this_close"])
def test_a_strategy_that_would_profit_from_peeking_does_not(fill: str) -> None:
    """Go long after an up bar (known at its close), flat after a down bar.

    Filled on its own bar (a look-ahead fill) it would hold every up bar and only up bars; filled no earlier
    than its close it holds the following, down, bars: every trade must lose.
    """
    bars = _alternating_bars()
    up = bars.close > bars.open
    codes = np.where(up, LONG, FLAT).astype(np.int8)
    result = run_events(bars, codes, _config(fill))
    assert len(result.trades) > 50
    assert (result.trades.pnl < 0).all()
    if fill != "this_close":
        assert (result.trades.entry_bar % 2 == 1).all(), "entries fill on the bar after the up bar"
    assert result.metrics["Return [%]"] < -50  # type: ignore[operator]


def test_next_close_fills_on_the_close_of_the_following_bar() -> None:
    bars = _alternating_bars()
    up = bars.close > bars.open
    codes = np.where(up, LONG, FLAT).astype(np.int8)
    result = run_events(bars, codes, _config("next_close"))
    decided = np.flatnonzero(up)[: len(result.trades)]
    np.testing.assert_array_equal(result.trades.entry_bar, decided + 1)
    np.testing.assert_array_equal(result.trades.entry_price, bars.close[decided + 1])


def test_the_peeking_oracle_itself_would_profit() -> None:
    """The control: the same rule reading the *next* bar (true look-ahead) wins every trade, so the test above
    can tell a peeking engine from a causal one."""
    bars = _alternating_bars()
    up_next = np.r_[(bars.close > bars.open)[1:], False]
    codes = np.where(up_next, LONG, FLAT).astype(np.int8)
    result = run_events(bars, codes, _config("next_open"))
    assert (result.trades.pnl > 0).all()


def _random_bars(n: int, seed: int) -> Bars:
    rng = np.random.default_rng(seed)
    close = 100 * np.exp(np.cumsum(rng.normal(0, 0.02, n)))
    open_ = close * np.exp(rng.normal(0, 0.005, n))
    return make_bars(close=close, open_=open_, volume=rng.uniform(1e4, 1e5, n))


def _perturbed_after(bars: Bars, k: int, seed: int) -> Bars:
    rng = np.random.default_rng(seed)
    factor = np.ones(len(bars))
    factor[k + 1 :] = np.exp(np.cumsum(rng.normal(0, 0.05, len(bars) - k - 1)))
    return Bars.from_arrays(
        open=bars.open * factor, high=bars.high * factor, low=bars.low * factor, close=bars.close * factor,
        volume=bars.volume, dates=bars.dates,
    )  # fmt: skip


@pytest.mark.parametrize("strategy", sorted(REGISTRY))
@pytest.mark.parametrize("risk", ["fixed_fraction", "volatility_target", "kelly_fraction"])
def test_changing_the_future_never_changes_the_past(strategy: str, risk: str) -> None:
    bars = _random_bars(400, seed=11)
    k = 250
    future = _perturbed_after(bars, k, seed=12)
    params = {"period": 10} if strategy in ("donchian_breakout", "bollinger_reversion") else {}
    risk_params = {"min_trades": 2} if risk == "kelly_fraction" else {}
    config = BacktestConfig.model_validate(
        {
            "symbols": ["T"],
            "strategy": {"name": strategy, "params": params},
            "risk": {"model": risk, "params": risk_params},
            "execution": {"allow_short": True, "fee_bps": 5, "slippage_bps": 2},
        }
    )
    a = run_backtest(bars, config)
    b = run_backtest(future, config)
    if a.position[k + 1 :].any():  # (a Kelly sizer that learned f = 0 stops trading: nothing to perturb)
        assert not np.array_equal(a.equity, b.equity), "the perturbation must matter after bar k"
    np.testing.assert_array_equal(a.equity[: k + 1], b.equity[: k + 1])
    np.testing.assert_array_equal(a.position[: k + 1], b.position[: k + 1])
    closed_by_k = a.trades.exit_bar <= k
    np.testing.assert_array_equal(a.trades.pnl[closed_by_k], b.trades.pnl[b.trades.exit_bar <= k])
