"""Risk models: hand-computed fractions and the sizes they produce."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest

from shared.domain.backtest import BacktestConfig
from shared.domain.backtest.engine import run_events
from shared.domain.backtest.risk import (
    KellyFractionParams,
    VolatilityTargetParams,
    decision_fractions,
    kelly_fraction,
)
from shared.domain.backtest.strategies import FLAT, LONG, SHORT
from tests.unit.backtest.conftest import make_bars


def config(risk: dict, **execution: object) -> BacktestConfig:
    return BacktestConfig.model_validate(
        {
            "symbols": ["T"],
            "strategy": {"name": "buy_and_hold"},
            "risk": risk,
            "execution": execution,
            "initial_cash": 1000.0,
        }
    )


def test_fixed_fraction_sizes_a_share_of_equity() -> None:
    bars = make_bars(close=[10, 10, 10])
    result = run_events(
        bars, np.array([LONG, 0, 0], np.int8), config({"model": "fixed_fraction", "params": {"fraction": 0.25}})
    )
    assert result.position[1] == 25  # 0.25 * 1000 / 10


def test_volatility_target_fraction_by_hand() -> None:
    close = [100, 102, 99, 101, 100, 104, 103]
    bars = make_bars(close=close)
    params = VolatilityTargetParams(target_volatility=0.2, lookback=3, max_fraction=1.0, periods_per_year=252)
    fractions = decision_fractions("volatility_target", params, bars)
    log_returns = [math.log(close[i] / close[i - 1]) for i in range(1, len(close))]
    for t in range(len(close)):
        if t < 3:
            assert fractions[t] == 0, "no sizing before the lookback fills"
        else:
            vol = statistics.stdev(log_returns[t - 3 : t]) * math.sqrt(252)
            assert fractions[t] == pytest.approx(min(0.2 / vol, 1.0), rel=1e-12)
    assert fractions[3:].min() > 0 and fractions.max() <= 1


def test_volatility_target_is_clamped() -> None:
    bars = make_bars(close=[100, 100.01, 100, 100.01, 100, 100.01])  # ~0.2 % annualised volatility
    params = VolatilityTargetParams(target_volatility=0.5, lookback=2, max_fraction=0.6)
    fractions = decision_fractions("volatility_target", params, bars)
    assert fractions[2:].tolist() == [0.6] * 4
    flat = decision_fractions("volatility_target", params, make_bars(close=[100] * 5))
    assert flat[2:].tolist() == [0.6] * 3  # zero volatility: the upper clamp, not a division by zero


def test_volatility_target_entry_before_lookback_opens_nothing() -> None:
    bars = make_bars(close=[100, 101, 102, 103, 104, 105])
    risk = {"model": "volatility_target", "params": {"lookback": 3, "target_volatility": 0.1}}
    early = run_events(bars, np.array([LONG, 0, 0, 0, 0, 0], np.int8), config(risk))
    assert not early.position.any() and early.orders["unfilled_too_small"] == 1
    later = run_events(bars, np.array([0, 0, 0, LONG, 0, 0], np.int8), config(risk))
    assert later.position[4] > 0


def test_kelly_fraction_formula() -> None:
    params = KellyFractionParams(fraction=0.5, min_trades=5, warmup_fraction=0.1, max_fraction=1.0)
    assert kelly_fraction(4, 3, 1, 0.3, -0.1, params) == 0.1  # warm-up until 5 trades closed
    # p = 0.6, R = (0.3 / 3) / (0.2 / 2) = 1 -> f = 0.6 - 0.4 = 0.2, half Kelly 0.1
    assert kelly_fraction(5, 3, 2, 0.3, -0.2, params) == pytest.approx(0.1, rel=1e-12)
    # p = 0.2, R = 1 -> f < 0 -> clamped to 0
    assert kelly_fraction(5, 1, 4, 0.1, -0.4, params) == 0
    # no losses: f = p = 1 -> 0.5
    assert kelly_fraction(5, 5, 0, 0.5, 0.0, params) == 0.5


def test_kelly_sizes_from_trades_closed_before_the_decision() -> None:
    # three round trips: +10 %, +10 %, -5 % (entries and exits at the open), then a fourth entry
    opens = [100, 100, 110, 100, 110, 100, 95, 100, 100, 100]
    bars = make_bars(close=opens, open_=opens)
    codes = np.array([LONG, FLAT, LONG, FLAT, LONG, FLAT, 0, LONG, 0, 0], np.int8)
    risk = {
        "model": "kelly_fraction",
        "params": {"fraction": 0.5, "min_trades": 3, "warmup_fraction": 0.2, "max_fraction": 1.0},
    }
    result = run_events(bars, codes, config(risk))
    trades = result.trades.to_records()
    assert [t["entry_bar"] for t in trades] == [1, 3, 5]
    assert [round(t["return_pct"], 6) for t in trades] == [10.0, 10.0, -5.0]
    # warm-up entries: 20 % of equity
    assert trades[0]["size"] == 2  # floor(0.2 * 1000 / 100)
    # 4th entry decided on bar 7 after three closed trades: p = 2/3, R = 0.10 / 0.05 = 2
    # f = 2/3 - (1/3) / 2 = 0.5, half Kelly 0.25 of equity at the fill (bar 8, open 100)
    assert result.open_position is not None
    equity_at_fill = result.equity[7]
    assert result.open_position.size == math.floor(0.25 * equity_at_fill / 100)


def test_kelly_reversal_does_not_use_the_trade_it_closes() -> None:
    opens = [100, 100, 150, 150, 150]
    bars = make_bars(close=opens, open_=opens)
    codes = np.array([LONG, SHORT, 0, 0, 0], np.int8)
    risk = {"model": "kelly_fraction", "params": {"min_trades": 1, "warmup_fraction": 0.5, "fraction": 1.0}}
    result = run_events(bars, codes, config(risk, allow_short=True))
    # the short is decided on bar 1, before the long (closed by the same order on bar 2) exists as a closed
    # trade: it is sized with the warm-up fraction, not with Kelly from a 100 % winner (which would be 1.0)
    assert result.trades.to_records()[0]["return_pct"] == pytest.approx(50.0)
    assert result.open_position is not None
    equity = 1000 + 5 * 50  # the long: floor(0.5 * 1000 / 100) = 5 units, +50 each
    assert result.open_position.size == -math.floor(0.5 * equity / 150)  # 4 units, not Kelly's 8
