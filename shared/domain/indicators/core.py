"""Technical indicators on NumPy arrays: the one implementation behind the script-facing ``ta`` module and the
backtest engine (``shared.domain.indicators.engine``).

Arrays in, fresh float64 arrays out (booleans for the cross detectors), every output as long as its input and
aligned bar for bar, warm-up positions NaN. The definitions (warm-up, flat series, NaN rules, smoothing, ddof) are
the table in the package docstring (``shared/domain/indicators/__init__.py``). ``shared/domain/sandbox/ta.py``
validates untrusted input, calls these and turns the results into tuples of plain floats.

Nothing here costs more than O(n) for a series of n values, whatever the period: window indicators use the block
machinery of ``_windows``; exponential recursions are evaluated in closed form over blocks short enough that the
scale factors stay far from overflow, so there is no per-element Python loop. No numba here: the sandbox process
that runs ``ta`` cannot map executable memory once its seccomp filter is loaded.

Inputs are float64 arrays (anything ``np.asarray`` turns into a 1-D float64 array); periods are ints >= 1. A period
longer than the series gives an all-NaN result without allocating anything period-sized.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from shared.domain.indicators._windows import (
    BoolArray,
    FloatArray,
    _blocks,
    _Centred,
    _comoment,
    _constant_windows,
    _head_tail,
    _m2,
    _nan,
    _window_reduce,
    _Windows,
)
from shared.domain.stats import TRADING_DAYS

# Largest power of (1/beta) the closed-form recursion lets a block reach: 2**300 keeps
# |x| * 2**300 finite for any |x| < 1e217 and the matching powers of beta far above the subnormals.
_LOG_SCALE_LIMIT = 300 * math.log(2.0)


def as_series(values: npt.ArrayLike) -> FloatArray:
    """``values`` as a one-dimensional float64 array (no copy when it already is one)."""
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError("expected a one-dimensional series")
    return array


def _check_period(period: int, name: str = "period") -> int:
    if isinstance(period, bool) or not isinstance(period, int | np.integer) or period < 1:
        raise ValueError(f"{name} must be an int >= 1")
    return int(period)


# ---------------------------------------------------------------------------------------------
# Window indicators
# ---------------------------------------------------------------------------------------------


def rolling_sum(values: npt.ArrayLike, period: int) -> FloatArray:
    """Sum of the last ``period`` values; the first period - 1 outputs are NaN."""
    x, p = as_series(values), _check_period(period)
    return _window_reduce(x, p, np.add, 0.0)


def rolling_max(values: npt.ArrayLike, period: int) -> FloatArray:
    """Largest of the last ``period`` values (TA-Lib MAX); the first period - 1 outputs are NaN."""
    x, p = as_series(values), _check_period(period)
    return _window_reduce(x, p, np.maximum, -np.inf)


def rolling_min(values: npt.ArrayLike, period: int) -> FloatArray:
    """Smallest of the last ``period`` values (TA-Lib MIN); the first period - 1 outputs are NaN."""
    x, p = as_series(values), _check_period(period)
    return _window_reduce(x, p, np.minimum, np.inf)


def sma(values: npt.ArrayLike, period: int) -> FloatArray:
    """Simple moving average: mean of the last ``period`` values; the first period - 1 are NaN.

    A window of equal values gives that value exactly (as pandas and the engine's kernel do), not the rounded
    mean of its copies.
    """
    x, p = as_series(values), _check_period(period)
    out = _window_reduce(x, p, np.add, 0.0, mean=True)
    if 1 < p <= x.shape[0]:
        flat = _constant_windows(x, p)
        out[p - 1 :][flat] = x[p - 1 :][flat]
    return out


def wma(values: npt.ArrayLike, period: int) -> FloatArray:
    """Linearly weighted moving average (TA-Lib WMA): weights 1..period, the newest value heaviest.

    Window [s, i]: sum_j (j - s + 1) x_j / (p (p + 1) / 2). With the block split, the head part is
    n_head * S - R (S its plain sum, R its sum weighted by distance from the block's end) and the tail part
    is L + (n_head + 1) * T (T its plain sum, L its sum weighted by offset in its block): all local sums.
    """
    x, p = as_series(values), _check_period(period)
    n = x.shape[0]
    out = _nan(n)
    if p > n:
        return out
    with np.errstate(all="ignore"):
        finite = bool(np.isfinite(x).all())
        blocks = _blocks(x, p, 0.0)
        offsets = np.arange(p, dtype=np.float64)
        head, tail = _head_tail(blocks, np.add, 0.0, n, finite)
        head_r, _ = _head_tail(blocks * offsets[::-1], np.add, 0.0, n, finite)
        _, tail_l = _head_tail(blocks * offsets, np.add, 0.0, n, finite)
        n_head = (p - np.arange(n - p + 1) % p).astype(np.float64)
        total = n_head * head - head_r + tail_l + (n_head + 1.0) * tail
        np.divide(total, p * (p + 1) / 2.0, out=out[p - 1 :])
    return out


def stdev(values: npt.ArrayLike, period: int, ddof: int = 0) -> FloatArray:
    """Rolling standard deviation over ``period`` values, dividing by period - ddof.

    ddof=0 (population, the default) matches TA-Lib STDDEV and Bollinger bands; ddof=1 gives the sample
    standard deviation of pandas' default and ``statistics.stdev``. The first period - 1 outputs are NaN.
    """
    x, p = as_series(values), _check_period(period)
    if isinstance(ddof, bool) or not isinstance(ddof, int | np.integer) or not 0 <= ddof < p:
        raise ValueError("ddof must be an int with 0 <= ddof < period")
    n = x.shape[0]
    out = _nan(n)
    if p > n:
        return out
    with np.errstate(all="ignore"):
        m2 = _m2(x, p)
        np.sqrt(np.maximum(m2, 0.0) / (p - int(ddof)), out=out[p - 1 :])
    return out


def zscore(values: npt.ArrayLike, period: int, ddof: int = 0) -> FloatArray:
    """(value - SMA) / stdev over the last ``period`` values; NaN where the window is flat (stdev 0)."""
    x = as_series(values)
    with np.errstate(all="ignore"):
        deviation = stdev(x, period, ddof)
        out = (x - sma(x, period)) / deviation
        out[deviation == 0.0] = np.nan
    return out


def bollinger(values: npt.ArrayLike, period: int = 20, k: float = 2.0) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Bollinger bands (upper, middle, lower): middle = SMA, bands = middle +/- k * population stdev.

    Population standard deviation (ddof=0) as in TA-Lib BBANDS and Bollinger's own definition.
    """
    x = as_series(values)
    middle = sma(x, period)
    width = float(k) * stdev(x, period, 0)
    return middle + width, middle, middle - width


def correlation(a: npt.ArrayLike, b: npt.ArrayLike, period: int) -> FloatArray:
    """Rolling Pearson correlation of ``a`` and ``b`` over ``period`` values, in [-1, 1].

    NaN where either window is flat (zero variance: correlation undefined) or holds a NaN; the first
    period - 1 outputs are NaN.
    """
    x, y, p = as_series(a), as_series(b), _check_period(period)
    if x.shape != y.shape:
        raise ValueError("a and b must have the same length")
    n = x.shape[0]
    out = _nan(n)
    if p > n:
        return out
    with np.errstate(all="ignore"):
        finite = bool(np.isfinite(x).all() and np.isfinite(y).all())
        windows = _Windows(n, p)
        cx, cy = _Centred(x, windows, finite), _Centred(y, windows, finite)
        sxy = _comoment(cx, cy, windows, finite)
        sxx = _comoment(cx, cx, windows, finite)
        syy = _comoment(cy, cy, windows, finite)
        r = sxy / np.sqrt(sxx * syy)
        r[~((sxx > 0.0) & (syy > 0.0))] = np.nan
        np.clip(r, -1.0, 1.0, out=out[p - 1 :])
    return out


# ---------------------------------------------------------------------------------------------
# Recursive indicators
# ---------------------------------------------------------------------------------------------


def _smooth(x: FloatArray, period: int, alpha: float) -> FloatArray:
    """y_t = y_(t-1) + alpha (x_t - y_(t-1)), seeded with the mean of the first ``period`` values.

    Starts at the first non-NaN value of ``x``; the seed lands ``period - 1`` values later. Evaluated in
    closed form per block of L values: y_(t0+k) = beta^k (beta y_(t0-1) + alpha sum_(m<=k) beta^-m x_(t0+m)),
    with L chosen so that beta^-L <= 2**300 (series with values beyond 2**600 are scaled down by a power of
    two first); the only Python loop is over the blocks (n / L of them, L >= 189 for every alpha < 1),
    carrying the last value of one block into the next.
    """
    n = x.shape[0]
    out = _nan(n)
    not_nan = ~np.isnan(x)
    if not not_nan.any():
        return out
    first = int(not_nan.argmax())
    seed_at = first + period - 1
    if seed_at >= n:
        return out
    seed = float(x[first : seed_at + 1].sum()) / period
    out[seed_at] = seed
    rest = x[seed_at + 1 :]
    m = rest.shape[0]
    if m == 0:
        return out
    if alpha >= 1.0:  # period 1: the series itself
        out[seed_at + 1 :] = rest
    else:
        # Values beyond 2**600 would overflow once multiplied by beta**-k (up to 2**300): scale by a
        # power of two (exact), smooth, scale back.
        largest = max(abs(seed), float(np.abs(rest).max()))
        scale = 2.0 ** math.frexp(largest)[1] if math.isfinite(largest) and largest > 2.0**600 else 1.0
        beta = 1.0 - alpha
        log_beta = math.log1p(-alpha)
        length = max(1, min(m, int(_LOG_SCALE_LIMIT / -log_beta)))
        # beta**k as exp(k ln beta): 4x faster than a power per element, within 1e-13 (|k ln beta| <= 208)
        powers = np.exp(np.arange(length, dtype=np.float64) * log_beta)
        blocks = _blocks(rest if scale == 1.0 else rest / scale, length, 0.0)
        sums = np.cumsum(blocks * (alpha / powers), axis=1)
        carries = np.empty(blocks.shape[0])
        last_power = float(powers[-1])
        previous = seed / scale
        for index, block_sum in enumerate(sums[:, -1].tolist()):
            carries[index] = previous
            previous = last_power * (beta * previous + block_sum)
        smoothed = (powers * (beta * carries[:, None] + sums)).reshape(-1)[:m]
        out[seed_at + 1 :] = smoothed if scale == 1.0 else smoothed * scale
    # The recursion's rule: once a NaN has entered (seed window included), it never leaves.
    poisoned = np.isnan(out[seed_at:])
    if poisoned.any():
        out[seed_at + int(poisoned.argmax()) :] = np.nan
    return out


def ema(values: npt.ArrayLike, period: int) -> FloatArray:
    """Exponential moving average, alpha = 2 / (period + 1), seeded with the SMA of the first period values.

    The TA-Lib / charting convention: the first period - 1 outputs are NaN, output period - 1 is the SMA.
    """
    x, p = as_series(values), _check_period(period)
    with np.errstate(all="ignore"):
        return _smooth(x, p, 2.0 / (p + 1.0))


def wilder(values: npt.ArrayLike, period: int) -> FloatArray:
    """Wilder's smoothing (RMA/SMMA): alpha = 1 / period, seeded with the SMA of the first period values."""
    x, p = as_series(values), _check_period(period)
    with np.errstate(all="ignore"):
        return _smooth(x, p, 1.0 / p)


def rsi(values: npt.ArrayLike, period: int = 14) -> FloatArray:
    """Wilder's relative strength index (TA-Lib RSI), 0..100.

    Changes from the previous value are split into gains and losses, each smoothed with Wilder's method
    seeded by the plain average of the first ``period`` changes; RSI = 100 * gain / (gain + loss). The
    first valid output is at index ``period`` (it needs period changes). 100 without losses, 0 without
    gains, 50 when both averages are 0 (no movement at all: neither side dominates; the backtest engine's
    convention since its first version, so a screen and a backtest of the same rule agree).
    """
    x, p = as_series(values), _check_period(period)
    n = x.shape[0]
    change = _nan(n)
    with np.errstate(all="ignore"):
        np.subtract(x[1:], x[:-1], out=change[1:])
        gain = _smooth(np.maximum(change, 0.0), p, 1.0 / p)  # np.maximum keeps NaN
        loss = _smooth(np.maximum(-change, 0.0), p, 1.0 / p)
        total = gain + loss
        out = 100.0 * gain / total
        out[total == 0.0] = 50.0
    return out


def true_range(high: npt.ArrayLike, low: npt.ArrayLike, close: npt.ArrayLike) -> FloatArray:
    """max(high - low, |high - previous close|, |low - previous close|); NaN at index 0 (TA-Lib TRANGE)."""
    h, lo, c = as_series(high), as_series(low), as_series(close)
    if not h.shape == lo.shape == c.shape:
        raise ValueError("high, low and close must have the same length")
    n = h.shape[0]
    previous = _nan(n)
    previous[1:] = c[:-1]
    with np.errstate(all="ignore"):
        return np.maximum(np.maximum(h - lo, np.abs(h - previous)), np.abs(lo - previous))


def atr(high: npt.ArrayLike, low: npt.ArrayLike, close: npt.ArrayLike, period: int = 14) -> FloatArray:
    """Average true range (TA-Lib ATR): Wilder's smoothing of the true range, seeded by its simple average.

    The true range needs the previous close, so the first valid output is at index ``period`` (the mean
    of true ranges 1..period).
    """
    p = _check_period(period)
    with np.errstate(all="ignore"):
        return _smooth(true_range(high, low, close), p, 1.0 / p)


def realized_volatility(close: npt.ArrayLike, lookback: int, periods_per_year: float = TRADING_DAYS) -> FloatArray:
    """Annualised sample standard deviation (ddof 1) of the last ``lookback`` log returns:
    ``stdev(log_returns(close), lookback, 1) * sqrt(periods_per_year)``. The first ``lookback`` outputs are NaN
    (``lookback`` returns need ``lookback + 1`` closes); ``lookback`` >= 2.
    """
    with np.errstate(all="ignore"):
        return stdev(log_returns(close), lookback, 1) * math.sqrt(periods_per_year)


def macd(
    values: npt.ArrayLike, fast: int = 12, slow: int = 26, signal: int = 9
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """MACD (line, signal, histogram): line = EMA(fast) - EMA(slow); signal = EMA(signal) of the line's
    valid part; histogram = line - signal.

    Both EMAs are the standalone SMA-seeded ones, so the line is valid from index slow - 1 and the
    signal and histogram from slow + signal - 2. (TA-Lib's MACD seeds its fast EMA later, at bar
    slow - fast, so its first values differ slightly from these; the difference decays geometrically.)
    """
    x = as_series(values)
    f, s, g = _check_period(fast, "fast"), _check_period(slow, "slow"), _check_period(signal, "signal")
    if f >= s:
        raise ValueError("fast must be shorter than slow")
    with np.errstate(all="ignore"):
        line = _smooth(x, f, 2.0 / (f + 1.0)) - _smooth(x, s, 2.0 / (s + 1.0))
        signal_line = _smooth(line, g, 2.0 / (g + 1.0))
        return line, signal_line, line - signal_line


def drawdown(values: npt.ArrayLike) -> FloatArray:
    """value / running maximum - 1 (0 at a new high, negative below it).

    Recursive: starts at the first non-NaN value; a NaN after that makes every later output NaN. NaN
    where the running maximum is not positive (a drawdown from a peak <= 0 means nothing).
    """
    x = as_series(values)
    n = x.shape[0]
    out = _nan(n)
    not_nan = ~np.isnan(x)
    if not not_nan.any():
        return out
    first = int(not_nan.argmax())
    peak = np.maximum.accumulate(x[first:])  # np.maximum propagates NaN to every later peak
    with np.errstate(all="ignore"):
        result = x[first:] / peak - 1.0
    result[~(peak > 0.0)] = np.nan
    out[first:] = result
    return out


# ---------------------------------------------------------------------------------------------
# Returns and crosses
# ---------------------------------------------------------------------------------------------


def pct_change(values: npt.ArrayLike, periods: int = 1) -> FloatArray:
    """value / value ``periods`` bars earlier - 1 (like pandas); the first ``periods`` outputs are NaN.

    Plain IEEE arithmetic: a zero earlier value gives +/-inf (or NaN for 0/0), as in pandas.
    """
    x, k = as_series(values), _check_period(periods, "periods")
    out = _nan(x.shape[0])
    if k < x.shape[0]:
        with np.errstate(all="ignore"):
            np.subtract(x[k:] / x[:-k], 1.0, out=out[k:])
    return out


def log_returns(values: npt.ArrayLike, periods: int = 1) -> FloatArray:
    """ln(value / value ``periods`` bars earlier); the first ``periods`` outputs are NaN.

    Plain IEEE arithmetic: a non-positive ratio gives NaN (negative) or -inf / +inf (zeros).
    """
    x, k = as_series(values), _check_period(periods, "periods")
    out = _nan(x.shape[0])
    if k < x.shape[0]:
        with np.errstate(all="ignore"):
            np.log(x[k:] / x[:-k], out=out[k:])
    return out


def _cross_inputs(a: npt.ArrayLike, b: npt.ArrayLike | float) -> tuple[FloatArray, FloatArray]:
    x = as_series(a)
    level = np.asarray(b, dtype=np.float64)
    if level.ndim == 0:
        return x, np.full(x.shape[0], float(level))
    y = as_series(level)
    if x.shape != y.shape:
        raise ValueError("a and b must have the same length")
    return x, y


def crossover(a: npt.ArrayLike, b: npt.ArrayLike | float) -> BoolArray:
    """True on the bars where ``a`` crosses above ``b``: a > b now and a <= b on the previous bar.

    ``b`` is a series of the same length or one number (a fixed level). False at index 0 and wherever
    any of the four values involved is NaN (every comparison with NaN is false).
    """
    x, y = _cross_inputs(a, b)
    out = np.zeros(x.shape[0], dtype=np.bool_)
    out[1:] = (x[1:] > y[1:]) & (x[:-1] <= y[:-1])
    return out


def crossunder(a: npt.ArrayLike, b: npt.ArrayLike | float) -> BoolArray:
    """True on the bars where ``a`` crosses below ``b``: a < b now and a >= b on the previous bar."""
    x, y = _cross_inputs(a, b)
    out = np.zeros(x.shape[0], dtype=np.bool_)
    out[1:] = (x[1:] < y[1:]) & (x[:-1] >= y[:-1])
    return out
