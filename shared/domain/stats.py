"""Return statistics shared by the backtest metrics and the robustness methods: the one Sharpe ratio.

``TRADING_DAYS`` is the one annualisation constant for daily bars (252 trading days a year). The backtest metrics'
"Sharpe Ratio" row keeps backtesting.py's own definition (annual geometric return over annual compounded
volatility; see ``shared.domain.backtest.metrics``), because the golden tests hold the engine to it; every other
Sharpe (the Probabilistic Sharpe Ratio's observed per-period Sharpe, the robustness portfolio Sharpe, the bootstrap
paths' Sharpe) is :func:`sharpe_ratio`.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

TRADING_DAYS = 252  # periods a year for daily bars (weekdays); 365 when bars fall on weekends too


def sharpe_ratio(returns: npt.ArrayLike, risk_free_rate: float = 0.0, periods_per_year: float = TRADING_DAYS) -> float:
    """Annualised Sharpe ratio of per-period simple returns.

    ``excess = returns - risk_free_rate / periods_per_year`` (the rate is annual); the result is
    ``mean(excess) / std(excess, ddof=1) * sqrt(periods_per_year)``. ``periods_per_year=1`` gives the
    per-period (not annualised) ratio. NaN with fewer than two returns or when the sample standard deviation
    is zero or not finite (no variance: the ratio is undefined).
    """
    values = np.asarray(returns, dtype=np.float64)
    excess = values - risk_free_rate / periods_per_year if risk_free_rate else values
    std = float(np.std(excess, ddof=1)) if len(excess) > 1 else math.nan
    if not (std and math.isfinite(std)):
        return math.nan
    return float(np.mean(excess)) / std * math.sqrt(periods_per_year)
