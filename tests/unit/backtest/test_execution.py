"""Execution simulator, native convention: hand-computed fills, fees, slippage adapters and edge cases."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from shared.domain.backtest import BacktestConfig, Bars
from shared.domain.backtest.engine import BacktestResult, run_events
from shared.domain.backtest.strategies import FLAT, LONG, SHORT
from tests.unit.backtest.conftest import make_bars


def config(risk: dict[str, Any] | None = None, cash: float = 1000.0, **execution: Any) -> BacktestConfig:
    return BacktestConfig.model_validate(
        {
            "symbols": ["T"],
            "strategy": {"name": "buy_and_hold"},
            "risk": risk or {"model": "fixed_fraction"},
            "execution": execution,
            "initial_cash": cash,
        }
    )


def events(n: int, at: dict[int, int]) -> np.ndarray:
    out = np.zeros(n, dtype=np.int8)
    for bar, code in at.items():
        out[bar] = code
    return out


def run(bars: Bars, at: dict[int, int], **kwargs: Any) -> BacktestResult:
    return run_events(bars, events(len(bars), at), config(**kwargs))


def cash_of(result: BacktestResult, bars: Bars) -> np.ndarray:
    return result.equity - result.position * bars.close


# prices: bar 0 and 1 at 10, bar 2 closes at 12, bar 3 opens 12, last bar 11
BARS = make_bars(close=[10, 10, 12, 12, 11], open_=[10, 10, 11, 12, 13])


def test_next_open_fill_whole_units_bps_and_fixed_fee() -> None:
    result = run(BARS, {0: LONG, 2: FLAT}, fee_bps=10, fixed_fee=1.0)
    # entry at open[1] = 10: budget 1000 - 1 = 999, unit cost 10 * 1.001 -> floor(99.8) = 99 units
    # fee 1 + 0.001 * 99 * 10 = 1.99; cash 1000 - 990 - 1.99 = 8.01
    # exit at open[3] = 12: fee 1 + 0.001 * 99 * 12 = 2.188; cash 8.01 + 1188 - 2.188 = 1193.822
    (trade,) = result.trades.to_records()
    assert trade["size"] == 99
    assert (trade["entry_bar"], trade["exit_bar"]) == (1, 3)
    assert (trade["entry_price"], trade["exit_price"]) == (10, 12)
    assert trade["commission"] == pytest.approx(1.99 + 2.188, rel=1e-12)
    assert trade["pnl"] == pytest.approx(99 * 2 - 4.178, rel=1e-12)
    assert result.equity.tolist() == pytest.approx([1000, 8.01 + 990, 8.01 + 99 * 12, 1193.822, 1193.822], rel=1e-12)
    assert result.metrics["Fees Paid [$]"] == pytest.approx(4.178, rel=1e-12)
    assert result.metrics["Commissions [$]"] == pytest.approx(4.178, rel=1e-12)
    # turnover: filled value 990 + 1188 over mean equity
    assert result.metrics["Turnover [x]"] == pytest.approx((990 + 1188) / np.mean(result.equity), rel=1e-12)
    assert result.orders["fills"] == 2


def test_fractional_units() -> None:
    result = run(BARS, {0: LONG}, fee_bps=10, fixed_fee=1.0, fractional_units=True)
    units = 999 / (10 * 1.001)
    assert result.position[1] == pytest.approx(units, rel=1e-12)
    assert cash_of(result, BARS)[1] == pytest.approx(0.0, abs=1e-9)
    assert result.open_position is not None and result.open_position.size == pytest.approx(units, rel=1e-12)


def test_integer_units_by_default() -> None:
    result = run(make_bars(close=[7, 7, 7], open_=[7, 7.3, 7]), {0: LONG})
    assert result.position[1] == 136  # floor(1000 / 7.3)


@pytest.mark.parametrize(
    ("execution", "buy", "sell"),
    [
        ({"slippage_bps": 50}, 10 * 1.005, 12 * 0.995),
        ({"slippage_model": {"model": "spread_pct", "params": {"spread_pct": 0.2}}}, 10.01, 12 * 0.999),
        (
            {"slippage_bps": 10, "slippage_model": {"model": "spread_pct", "params": {"spread_pct": 1}}},
            10 * 1.006,
            12 * 0.994,
        ),
    ],
)
def test_bps_and_spread_slippage_move_the_price_against_the_trade(execution: dict, buy: float, sell: float) -> None:
    result = run(BARS, {0: LONG, 2: FLAT}, **execution)
    (trade,) = result.trades.to_records()
    assert trade["entry_price"] == pytest.approx(buy, rel=1e-12)
    assert trade["exit_price"] == pytest.approx(sell, rel=1e-12)
    assert trade["size"] == int(1000 // buy)
    assert result.trades.pnl[0] == pytest.approx(trade["size"] * (sell - buy), rel=1e-12)


def test_spread_slippage_on_a_short() -> None:
    result = run(
        BARS,
        {0: SHORT, 2: FLAT},
        allow_short=True,
        slippage_model={"model": "spread_pct", "params": {"spread_pct": 0.2}},
    )
    (trade,) = result.trades.to_records()
    assert trade["size"] == -int(1000 // 9.99)
    assert trade["entry_price"] == pytest.approx(9.99, rel=1e-12)  # sold at the bid
    assert trade["exit_price"] == pytest.approx(12.012, rel=1e-12)  # bought back at the ask


def participation(impact_bps: float, exponent: float, cap_bps: float) -> dict[str, Any]:
    return {
        "model": "participation_rate",
        "params": {"impact_bps": impact_bps, "exponent": exponent, "max_impact_bps": cap_bps},
    }


def test_participation_rate_linear_impact() -> None:
    bars = make_bars(close=[10, 10, 10, 10], open_=[10, 10, 10, 10], volume=[1000] * 4)
    result = run(bars, {0: LONG, 1: FLAT}, slippage_model=participation(100, 1.0, 50))
    # first estimate 100 units (10 % of volume -> 10 bps); sized again at 10.01: 99 units, priced at their own
    # impact: 99 / 1000 * 100 bps = 9.9 bps -> 10.0099; exit of 99 units: 10 * (1 - 0.00099)
    (trade,) = result.trades.to_records()
    assert trade["size"] == 99
    assert trade["entry_price"] == pytest.approx(10.0099, rel=1e-12)
    assert trade["exit_price"] == pytest.approx(9.9901, rel=1e-12)
    assert cash_of(result, bars).min() >= 0


def test_participation_rate_square_root_and_cap() -> None:
    bars = make_bars(close=[10] * 4, open_=[10] * 4, volume=[1000] * 4)
    result = run(bars, {0: LONG}, slippage_model=participation(100, 0.5, 500))
    # first estimate 100 units: impact 100 bps * sqrt(0.1) = 31.6 bps -> floor(1000 / 10.0316) = 99 units,
    # priced at their own impact 100 bps * sqrt(0.099)
    assert result.position[1] == 99
    assert result.open_position is not None
    assert result.open_position.entry_price == pytest.approx(10 * (1 + 0.01 * np.sqrt(99 / 1000)), rel=1e-12)
    tiny_volume = make_bars(close=[10] * 4, open_=[10] * 4, volume=[50] * 4)
    capped = run(tiny_volume, {0: LONG}, slippage_model=participation(100, 0.5, 30))
    assert capped.open_position is not None
    assert capped.open_position.entry_price == pytest.approx(10.03, rel=1e-12)  # 30 bps cap
    assert capped.position[1] == int(1000 // 10.03)


ZERO = make_bars(close=[10, 10, 11, 12, 12], open_=[10, 10, 11, 12, 12], volume=[1e5, 0, 1e5, 1e5, 1e5])


def test_zero_volume_bar_order_waits_for_the_next_bar() -> None:
    result = run(ZERO, {0: LONG}, on_zero_volume="wait")
    assert result.position.tolist() == [0, 0, 90, 90, 90]  # filled at open[2] = 11: floor(1000 / 11)
    assert result.open_position is not None and result.open_position.entry_bar == 2


def test_zero_volume_bar_order_cancelled() -> None:
    result = run(ZERO, {0: LONG}, on_zero_volume="cancel")
    assert not result.position.any()
    assert result.orders["cancelled_zero_volume"] == 1


def test_zero_volume_ignored_fills() -> None:
    result = run(ZERO, {0: LONG}, on_zero_volume="ignore")
    assert result.position[1] == 100


def test_a_newer_signal_replaces_a_waiting_order() -> None:
    result = run(ZERO, {0: LONG, 1: FLAT}, on_zero_volume="wait")
    assert not result.position.any()


def test_flatten_at_end_closes_at_the_last_close() -> None:
    kept = run(BARS, {0: LONG}, fee_bps=10)
    assert len(kept.trades) == 0 and kept.open_position is not None
    flat = run(BARS, {0: LONG}, fee_bps=10, flatten_at_end=True)
    assert flat.open_position is None
    (trade,) = flat.trades.to_records()
    assert (trade["exit_bar"], trade["exit_price"]) == (4, 11)
    assert flat.position[-1] == 0
    # the last equity is cash after the exit fee
    units = trade["size"]
    assert flat.equity[-1] == pytest.approx(kept.equity[-1] - 0.001 * units * 11, rel=1e-12)


def test_fill_at_next_close_and_this_close() -> None:
    next_close = run(BARS, {1: LONG}, fill="next_close")
    assert next_close.open_position is not None
    assert (next_close.open_position.entry_bar, next_close.open_position.entry_price) == (2, 12)
    this_close = run(BARS, {1: LONG}, fill="this_close")
    assert this_close.open_position is not None
    assert (this_close.open_position.entry_bar, this_close.open_position.entry_price) == (1, 10)


def test_shorts_only_when_allowed() -> None:
    long_only = run(BARS, {0: SHORT})
    assert not long_only.position.any()
    short = run(BARS, {0: SHORT}, allow_short=True)
    assert short.position[1] == -100
    assert cash_of(short, BARS)[1] == pytest.approx(2000)  # 1000 + proceeds 100 * 10
    assert short.equity[2] == pytest.approx(2000 - 100 * 12)


def test_same_direction_signal_keeps_the_position() -> None:
    result = run(BARS, {0: LONG, 2: LONG}, fee_bps=10)
    assert result.orders["fills"] == 1


def test_reversal_closes_then_opens() -> None:
    result = run(BARS, {0: LONG, 2: SHORT}, allow_short=True, fixed_fee=2.0)
    (trade,) = result.trades.to_records()
    assert (trade["size"], trade["exit_bar"]) == (99, 3)  # floor((1000 - 2) / 10) = 99
    assert result.open_position is not None and result.open_position.entry_bar == 3
    assert result.orders["fills"] == 3  # close and open are two orders, each paying the fixed fee
    cash_before_open = 1000 - 2 - 990 + 99 * 12 - 2
    assert result.open_position.size == -((cash_before_open - 2) // 12)


def test_short_squeeze_liquidates_at_zero_equity() -> None:
    bars = make_bars(close=[10, 10, 10, 30, 31], open_=[10, 10, 10, 30, 31])
    result = run(bars, {0: SHORT}, allow_short=True)
    assert result.orders["bust_bar"] == 3
    assert result.equity[3:].tolist() == [0, 0]
    assert result.metrics["Equity Final [$]"] == 0


def test_cash_never_negative_and_units_whole_under_random_orders() -> None:
    rng = np.random.default_rng(7)
    for trial in range(200):
        n = 60
        close = 50 * np.exp(np.cumsum(rng.normal(0, 0.03, n)))
        open_ = close * np.exp(rng.normal(0, 0.01, n))
        volume = rng.choice([0.0, 500.0, 5e4], n, p=[0.1, 0.3, 0.6])
        bars = make_bars(close=close, open_=open_, volume=volume)
        codes = rng.choice([0, LONG, SHORT, FLAT], n, p=[0.7, 0.1, 0.1, 0.1]).astype(np.int8)
        slip = [
            {"model": "none"},
            {"model": "spread_pct", "params": {"spread_pct": 0.5}},
            participation(200, 0.5, 100),
        ][trial % 3]
        cfg = config(
            risk={"model": "fixed_fraction", "params": {"fraction": float(rng.uniform(0.2, 1.0))}},
            fee_bps=float(rng.uniform(0, 50)),
            fixed_fee=float(rng.uniform(0, 5)),
            slippage_bps=float(rng.uniform(0, 20)),
            slippage_model=slip,
            fill=["next_open", "next_close", "this_close"][trial % 3],
            fractional_units=bool(trial % 2),
            on_zero_volume=["wait", "cancel", "ignore"][trial % 3],
        )
        result = run_events(bars, codes, cfg)
        cash = cash_of(result, bars)
        assert cash.min() >= -1e-9, trial
        assert (result.position >= 0).all(), "long-only config never holds a short"
        if not cfg.execution.fractional_units:
            assert np.array_equal(result.position, np.floor(result.position)), trial
