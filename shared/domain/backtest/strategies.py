"""Strategy registry: each strategy turns bars into causal order events.

A strategy returns one int8 event per bar, decided on that bar's close and never earlier:
``LONG`` (be long), ``SHORT`` (be short; flat when shorting is not allowed), ``FLAT`` (close), or ``NONE``.
Events are edge-triggered (emitted when the wish changes), so the execution simulator, not the strategy,
owns what "already long" means. The simulator fills an event no earlier than the next bar
(``fill = this_close`` is the explicit market-on-close exception).

``start`` is the first bar on which a strategy may decide: the first bar where every indicator it uses is
defined (``warmup``), plus one in the backtesting.py convention (which starts calling ``next()`` one bar later
so that crossovers have two points), and no earlier than ``min_start`` (the first bar the risk model can size:
a volatility target needs its lookback). State strategies read their state from ``start`` on, so an entry
condition already true then is acted on then.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field, model_validator

from shared.domain._jit import kernel
from shared.domain.backtest.bars import Bars
from shared.domain.indicators import engine as indicators

NONE = 0
LONG = 1
SHORT = -1
FLAT = 2

Events = NDArray[np.int8]


class StrategyParams(BaseModel):
    """Base of every strategy's parameters: unknown names are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class DualSmaParams(StrategyParams):
    fast: int = Field(default=10, ge=1, le=5000, description="bars of the fast simple moving average")
    slow: int = Field(default=20, ge=2, le=5000, description="bars of the slow simple moving average")

    @model_validator(mode="after")
    def _fast_below_slow(self) -> DualSmaParams:
        if self.fast >= self.slow:
            raise ValueError(f"fast ({self.fast}) must be less than slow ({self.slow})")
        return self


class RsiReversionParams(StrategyParams):
    period: int = Field(default=14, ge=2, le=1000, description="bars of Wilder's RSI")
    lower: float = Field(default=30.0, gt=0, lt=100, description="buy when RSI falls below this")
    upper: float = Field(default=70.0, gt=0, lt=100, description="sell (or short) when RSI rises above this")

    @model_validator(mode="after")
    def _lower_below_upper(self) -> RsiReversionParams:
        if self.lower >= self.upper:
            raise ValueError(f"lower ({self.lower}) must be less than upper ({self.upper})")
        return self


class DonchianBreakoutParams(StrategyParams):
    period: int = Field(default=20, ge=2, le=5000, description="channel of the previous N bars' high and low")


class BollingerReversionParams(StrategyParams):
    period: int = Field(default=20, ge=2, le=5000, description="bars of the middle band (SMA) and of the deviation")
    k: float = Field(default=2.0, gt=0, le=10, description="band width in population standard deviations")


class BuyAndHoldParams(StrategyParams):
    pass


@dataclass(frozen=True)
class StrategySignals:
    events: Events
    warmup: int  # first bar where every indicator is defined (backtesting.py's "first trading bar")
    start: int  # first bar a decision may be taken
    indicators: dict[str, NDArray[np.float64]]


@dataclass(frozen=True)
class Strategy:
    name: str
    params: type[StrategyParams]
    compute: Callable[[Bars, Any, int, int], StrategySignals]
    description: str


def first_valid(*arrays: NDArray[np.float64]) -> int:
    """Index of the first non-NaN value of the slowest indicator (backtesting.py's warm-up rule)."""
    return max((int(np.isnan(a).argmin()) for a in arrays), default=0)


@kernel
def crossover_events(fast: NDArray[np.float64], slow: NDArray[np.float64], start: int) -> Events:
    """LONG where ``fast`` crosses above ``slow`` (strictly, on bars t-1 and t), SHORT where it crosses below."""
    n = len(fast)
    events = np.zeros(n, dtype=np.int8)
    for t in range(max(start, 1), n):
        if fast[t - 1] < slow[t - 1] and fast[t] > slow[t]:
            events[t] = LONG
        elif slow[t - 1] < fast[t - 1] and slow[t] > fast[t]:
            events[t] = SHORT
    return events


@kernel
def state_events(
    enter_long: NDArray[np.bool_],
    enter_short: NDArray[np.bool_],
    exit_long: NDArray[np.bool_],
    exit_short: NDArray[np.bool_],
    start: int,
) -> Events:
    """Edge-triggered events of a state machine (flat -> long/short -> flat), run from ``start``."""
    n = len(enter_long)
    events = np.zeros(n, dtype=np.int8)
    state = 0
    for t in range(start, n):
        if enter_long[t] and state != 1:
            state = 1
            events[t] = LONG
        elif enter_short[t] and state != -1:
            state = -1
            events[t] = SHORT
        elif (state == 1 and exit_long[t]) or (state == -1 and exit_short[t]):
            state = 0
            events[t] = FLAT
    return events


def _never(n: int) -> NDArray[np.bool_]:
    return np.zeros(n, dtype=np.bool_)


def dual_sma(bars: Bars, p: DualSmaParams, start_offset: int, min_start: int = 0) -> StrategySignals:
    fast = indicators.sma(bars.close, p.fast)
    slow = indicators.sma(bars.close, p.slow)
    warmup = first_valid(fast, slow)
    start = max(warmup + start_offset, min_start)
    return StrategySignals(crossover_events(fast, slow, start), warmup, start, {"sma_fast": fast, "sma_slow": slow})


def rsi_reversion(bars: Bars, p: RsiReversionParams, start_offset: int, min_start: int = 0) -> StrategySignals:
    rsi = indicators.rsi(bars.close, p.period)
    warmup = first_valid(rsi)
    start = max(warmup + start_offset, min_start)
    with np.errstate(invalid="ignore"):
        events = state_events(rsi < p.lower, rsi > p.upper, _never(len(bars)), _never(len(bars)), start)
    return StrategySignals(events, warmup, start, {"rsi": rsi})


def donchian_upper_lower(bars: Bars, period: int) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Highest high and lowest low of the previous ``period`` bars (the current bar excluded)."""
    upper = np.full(len(bars), np.nan)
    lower = np.full(len(bars), np.nan)
    upper[1:] = indicators.rolling_max(bars.high, period)[:-1]
    lower[1:] = indicators.rolling_min(bars.low, period)[:-1]
    return upper, lower


def donchian_breakout(bars: Bars, p: DonchianBreakoutParams, start_offset: int, min_start: int = 0) -> StrategySignals:
    upper, lower = donchian_upper_lower(bars, p.period)
    warmup = first_valid(upper, lower)
    start = max(warmup + start_offset, min_start)
    close = bars.close
    with np.errstate(invalid="ignore"):
        events = state_events(close > upper, close < lower, _never(len(bars)), _never(len(bars)), start)
    return StrategySignals(events, warmup, start, {"channel_upper": upper, "channel_lower": lower})


def bollinger_bands(
    close: NDArray[np.float64], period: int, k: float
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    """Middle band (SMA) and the bands ``k`` population standard deviations around it."""
    mid = indicators.sma(close, period)
    sd = indicators.rolling_std(close, period, 0)
    return mid - k * sd, mid, mid + k * sd


def bollinger_reversion(
    bars: Bars, p: BollingerReversionParams, start_offset: int, min_start: int = 0
) -> StrategySignals:
    lo, mid, hi = bollinger_bands(bars.close, p.period, p.k)
    warmup = first_valid(lo, mid, hi)
    start = max(warmup + start_offset, min_start)
    c = bars.close
    with np.errstate(invalid="ignore"):
        events = state_events(c < lo, c > hi, c >= mid, c <= mid, start)
    return StrategySignals(events, warmup, start, {"band_lower": lo, "band_mid": mid, "band_upper": hi})


def buy_and_hold(bars: Bars, p: BuyAndHoldParams, start_offset: int, min_start: int = 0) -> StrategySignals:
    events = np.zeros(len(bars), dtype=np.int8)
    start = max(start_offset, min_start)
    if start < len(bars):
        events[start] = LONG
    return StrategySignals(events, 0, start, {})


REGISTRY: dict[str, Strategy] = {
    s.name: s
    for s in (
        Strategy("dual_sma", DualSmaParams, dual_sma, "long on fast SMA crossing above slow, short/exit below"),
        Strategy("rsi_reversion", RsiReversionParams, rsi_reversion, "long below `lower` RSI, short/exit above"),
        Strategy("donchian_breakout", DonchianBreakoutParams, donchian_breakout, "long above the N-bar high"),
        Strategy("bollinger_reversion", BollingerReversionParams, bollinger_reversion, "fade the bands, exit mid"),
        Strategy("buy_and_hold", BuyAndHoldParams, buy_and_hold, "long from the first bar (the benchmark)"),
    )
}
