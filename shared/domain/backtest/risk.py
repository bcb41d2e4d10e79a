"""Risk models: how much of equity an entry may commit, decided on the signal bar (never later).

* ``fixed_fraction``: the same fraction of equity on every entry.
* ``volatility_target``: ``target_volatility / realized volatility`` of the last ``lookback`` bar log returns
  (annualised), clamped to ``[0, max_fraction]``; no position at all before ``lookback`` returns exist. The
  per-bar volatility is annualised by ``sqrt(periods_per_year * Bars.bars_per_day)``: ``periods_per_year`` trading
  days times the bars of a trading day (1 for daily bars, so daily sizing is the plain ``sqrt(periods_per_year)``;
  intraday, the observed median bars per UTC day: a session's length, which a nominal 24 h / bar size would
  overstate for a 6.5-hour stock session, and no price, so no look-ahead).
* ``kelly_fraction``: ``f = p - (1 - p) / R`` from the trades closed before the decision (``p`` the share of
  winning trades, ``R`` the mean winning return over the mean losing return, both on per-trade returns),
  times ``fraction`` (the dampening, e.g. 0.5 = "half Kelly"), clamped to ``[0, max_fraction]``. Until
  ``min_trades`` trades have closed it sizes with ``warmup_fraction`` (else it could never learn).

The fractions are of equity at the fill; the simulator then converts them to units (whole units unless
fractional units are allowed) after fees and slippage, so cash never goes negative.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field

from shared.domain.backtest.bars import Bars
from shared.domain.indicators import engine as indicators
from shared.domain.stats import TRADING_DAYS

FIXED_FRACTION = 0
VOLATILITY_TARGET = 1
KELLY_FRACTION = 2


class RiskParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FixedFractionParams(RiskParams):
    fraction: float = Field(default=1.0, gt=0, le=1, description="fraction of equity committed on each entry")


class VolatilityTargetParams(RiskParams):
    target_volatility: float = Field(
        default=0.15, gt=0, le=5, description="annualised volatility aimed at (0.15 = 15 %)"
    )
    lookback: int = Field(default=20, ge=2, le=2520, description="bar log returns in the realized volatility")
    max_fraction: float = Field(default=1.0, gt=0, le=1, description="upper clamp of the fraction of equity")
    periods_per_year: float = Field(
        default=float(TRADING_DAYS),
        gt=0,
        le=366,
        description="trading days a year (annualisation; times bars per day intraday)",
    )


class KellyFractionParams(RiskParams):
    fraction: float = Field(default=0.5, gt=0, le=1, description="dampening: the share of the Kelly fraction used")
    min_trades: int = Field(default=10, ge=1, le=100_000, description="closed trades needed before Kelly sizing")
    warmup_fraction: float = Field(default=0.1, ge=0, le=1, description="fraction of equity until min_trades closed")
    max_fraction: float = Field(default=1.0, gt=0, le=1, description="upper clamp of the fraction of equity")


def first_sizable_bar(params: RiskParams) -> int:
    """First bar on which the model can size an entry (a volatility estimate needs ``lookback`` returns)."""
    if isinstance(params, VolatilityTargetParams):
        return params.lookback
    return 0


def decision_fractions(model: str, params: RiskParams, bars: Bars) -> NDArray[np.float64]:
    """Fraction of equity an entry decided on each bar may commit (Kelly: computed in the simulator)."""
    n = len(bars)
    if isinstance(params, FixedFractionParams):
        return np.full(n, params.fraction)
    if isinstance(params, VolatilityTargetParams):
        vol = indicators.realized_volatility(bars.close, params.lookback, params.periods_per_year * bars.bars_per_day)
        with np.errstate(divide="ignore", invalid="ignore"):
            fraction = np.where(vol > 0, params.target_volatility / vol, params.max_fraction)
        fraction = np.clip(fraction, 0.0, params.max_fraction)
        fraction[np.isnan(vol)] = 0.0
        return fraction
    if isinstance(params, KellyFractionParams):
        return np.full(n, np.nan)  # decided in the simulator from the trades closed so far
    raise ValueError(f"unknown risk model {model!r}")


def kelly_fraction(
    n_closed: int, wins: int, losses: int, sum_win: float, sum_loss: float, params: KellyFractionParams
) -> float:
    """The same rule as the simulator's (for tests and reports): see the module docstring."""
    if n_closed < params.min_trades:
        return params.warmup_fraction
    p = wins / n_closed
    if wins == 0:
        f = 0.0
    elif losses == 0 or sum_loss == 0:
        f = p
    else:
        ratio = (sum_win / wins) / (-sum_loss / losses)
        f = p - (1 - p) / ratio
    return float(min(max(f * params.fraction, 0.0), params.max_fraction))
