"""Indicator kernels on plain float64 arrays, NaN during the warm-up, causal (bar t uses bars <= t only).

``sma`` reproduces pandas' ``Series.rolling(n).mean()`` bit for bit (the same Kahan-compensated running sum,
the same rules for runs of equal values and for sign), because backtesting.py's reference strategies use it
and a crossover decided by the last bit of an average would otherwise differ from the reference.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from shared.domain.backtest._jit import kernel

FloatArray = NDArray[np.float64]


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


@kernel
def rolling_std(values: FloatArray, n: int, ddof: int) -> FloatArray:
    """Rolling standard deviation over ``n`` bars (two-pass per window: exact enough, O(n * window))."""
    size = len(values)
    out = np.full(size, np.nan)
    for i in range(n - 1, size):
        mean = 0.0
        for j in range(i - n + 1, i + 1):
            mean += values[j]
        mean /= n
        acc = 0.0
        for j in range(i - n + 1, i + 1):
            d = values[j] - mean
            acc += d * d
        out[i] = np.sqrt(acc / (n - ddof)) if n - ddof > 0 else np.nan
    return out


@kernel
def rolling_max(values: FloatArray, n: int) -> FloatArray:
    """Highest value of the last ``n`` bars, current bar included."""
    size = len(values)
    out = np.full(size, np.nan)
    for i in range(n - 1, size):
        best = values[i - n + 1]
        for j in range(i - n + 2, i + 1):
            if values[j] > best:
                best = values[j]
        out[i] = best
    return out


@kernel
def rolling_min(values: FloatArray, n: int) -> FloatArray:
    """Lowest value of the last ``n`` bars, current bar included."""
    size = len(values)
    out = np.full(size, np.nan)
    for i in range(n - 1, size):
        best = values[i - n + 1]
        for j in range(i - n + 2, i + 1):
            if values[j] < best:
                best = values[j]
        out[i] = best
    return out


@kernel
def rsi(close: FloatArray, n: int) -> FloatArray:
    """Wilder's RSI: first average over ``n`` changes is a plain mean, then Wilder smoothing (alpha = 1/n).

    Defined from bar ``n`` on (it needs ``n`` price changes). A window without losses is 100, without gains 0,
    flat is 50.
    """
    size = len(close)
    out = np.full(size, np.nan)
    if size <= n:
        return out
    gain = 0.0
    loss = 0.0
    for i in range(1, n + 1):
        change = close[i] - close[i - 1]
        if change > 0:
            gain += change
        else:
            loss -= change
    gain /= n
    loss /= n
    for i in range(n, size):
        if i > n:
            change = close[i] - close[i - 1]
            up = change if change > 0 else 0.0
            down = -change if change < 0 else 0.0
            gain = (gain * (n - 1) + up) / n
            loss = (loss * (n - 1) + down) / n
        if loss == 0.0:
            out[i] = 50.0 if gain == 0.0 else 100.0
        else:
            out[i] = 100.0 - 100.0 / (1.0 + gain / loss)
    return out


@kernel
def realized_volatility(close: FloatArray, lookback: int, periods_per_year: float) -> FloatArray:
    """Annualised standard deviation (ddof 1) of the last ``lookback`` log returns; NaN until they exist."""
    size = len(close)
    out = np.full(size, np.nan)
    if lookback < 2:
        return out
    returns = np.full(size, np.nan)
    for i in range(1, size):
        returns[i] = np.log(close[i] / close[i - 1])
    for i in range(lookback, size):
        mean = 0.0
        for j in range(i - lookback + 1, i + 1):
            mean += returns[j]
        mean /= lookback
        acc = 0.0
        for j in range(i - lookback + 1, i + 1):
            d = returns[j] - mean
            acc += d * d
        out[i] = np.sqrt(acc / (lookback - 1)) * np.sqrt(periods_per_year)
    return out
