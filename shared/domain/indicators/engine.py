"""The indicators the backtest engine uses (strategies, risk models, the parameter grid).

Everything but the SMA is the NumPy core's function (``shared.domain.indicators.core``), under the engine's names.
The SMA is the one compiled kernel: backtesting.py's reference strategies use pandas' ``rolling(n).mean()``, and a
crossover decided by the last bit of an average would otherwise differ from the reference, so :func:`sma`
reproduces pandas bit for bit (the same Kahan-compensated add and remove sums, the same rules for runs of equal
values and for sign). It is sequential, so it cannot be the sandbox's SMA (``ta`` runs without numba); the core's
vectorised ``sma`` has the same definition and agrees with it to a few units in the last place.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from shared.domain._jit import kernel
from shared.domain.indicators.core import realized_volatility, rolling_max, rolling_min, rsi
from shared.domain.indicators.core import stdev as rolling_std

FloatArray = NDArray[np.float64]

__all__ = ["realized_volatility", "rolling_max", "rolling_min", "rolling_std", "rsi", "sma", "sma_matrix"]


@kernel
def sma(values: FloatArray, n: int) -> FloatArray:
    """Simple moving average over ``n`` bars (pandas' algorithm: compensated add and remove sums)."""
    size = len(values)
    out = np.empty(size)
    nobs = 0
    sum_x = 0.0
    neg_ct = 0
    comp_add = 0.0
    comp_remove = 0.0
    same_run = 0
    prev = values[0] if size else np.nan
    for i in range(size):
        if i >= n:
            old = values[i - n]
            if not np.isnan(old):
                nobs -= 1
                y = -old - comp_remove
                t = sum_x + y
                comp_remove = t - sum_x - y
                sum_x = t
                if old < 0:
                    neg_ct -= 1
        val = values[i]
        if not np.isnan(val):
            nobs += 1
            y = val - comp_add
            t = sum_x + y
            comp_add = t - sum_x - y
            sum_x = t
            if val < 0:
                neg_ct += 1
            if val == prev:
                same_run += 1
            else:
                same_run = 1
            prev = val
        if nobs >= n and nobs > 0:
            result = sum_x / nobs
            if same_run >= nobs:
                result = prev
            elif (neg_ct == 0 and result < 0) or (neg_ct == nobs and result > 0):
                result = 0.0
        else:
            result = np.nan
        out[i] = result
    return out


@kernel
def sma_matrix(values: FloatArray, windows: NDArray[np.int64]) -> FloatArray:
    """One ``sma`` row per window: the shared input of a parameter grid."""
    out = np.empty((len(windows), len(values)))
    for k in range(len(windows)):
        out[k] = sma(values, windows[k])
    return out
