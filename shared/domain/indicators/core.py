"""Technical indicators on NumPy arrays: the numeric core behind the script-facing ``ta`` module.

Arrays in, fresh float64 arrays out (booleans for the cross detectors), every output as long as its
input and aligned bar for bar, warm-up positions NaN. The conventions are the industry ones (TA-Lib and
common charting): SMA-seeded EMA with alpha 2/(n+1), Wilder's smoothing for RSI and ATR, population
standard deviation for Bollinger bands. ``shared/domain/sandbox/ta.py`` validates untrusted input, calls these
and turns the results into tuples of plain floats; the backtest engine may call them directly.

Why the odd-looking algorithms: user scripts control the period, so nothing here may cost more than
O(n) for a series of n values, whatever the period. Rolling reductions therefore use the van Herk /
Gil-Werman block decomposition (every window of length p is a suffix of one block of p values plus a
prefix of the next), which costs a few vectorised passes for any p, keeps NaN confined to the windows
that contain it (a window's partial sums hold that window's values only, unlike differences of one long
cumulative sum) and bounds rounding error by the window rather than by the series length. Exponential
recursions are evaluated in closed form over blocks short enough that the scale factors stay far from
overflow, so there is no per-element Python loop.

NaN conventions (documented for users in README's "Indicator library" section):

* window indicators (SMA, WMA, rolling sums/max/min, stdev, z-score, Bollinger, correlation): a window
  containing a NaN gives NaN; the output recovers once the NaN has left the window;
* recursive indicators (EMA, Wilder smoothing, RSI, ATR, MACD, drawdown): leading NaNs are skipped (the
  recursion, warm-up included, starts at the first non-NaN value, so ``ema(rsi(x, 14), 5)`` works); a NaN
  after that start makes that output and every later one NaN.

Inputs are float64 arrays (anything ``np.asarray`` turns into a 1-D float64 array); periods are ints >= 1.
A period longer than the series gives an all-NaN result without allocating anything period-sized.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]

# Largest power of (1/beta) the closed-form recursion lets a block reach: 2**300 keeps
# |x| * 2**300 finite for any |x| < 1e217 and the matching powers of beta far above the subnormals.
_LOG_SCALE_LIMIT = 300 * math.log(2.0)
# Block width for sums of finite data: wide enough that accumulating along rows is fast, narrow enough
# that a block's partial sums stay close to the window's own magnitude.
_SUM_BLOCK = 256


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


def _nan(n: int) -> FloatArray:
    return np.full(n, np.nan)


# ---------------------------------------------------------------------------------------------
# Window machinery
# ---------------------------------------------------------------------------------------------


def _blocks(x: FloatArray, p: int, fill: float, divisor: float = 1.0) -> FloatArray:
    """A copy of ``x`` (divided by ``divisor``, in the same pass) padded with ``fill`` to a multiple of ``p``,
    shaped (blocks, p).

    The padding is never part of a window (a window's last value is at most n - 1); ``fill`` is the
    reduction's identity only so that the arrays are tidy. Size < n + p <= 2n.
    """
    n = x.shape[0]
    count = -(-n // p)
    buffer = np.empty(count * p)
    if divisor == 1.0:
        buffer[:n] = x
    else:
        np.divide(x, divisor, out=buffer[:n])
    buffer[n:] = fill
    return buffer.reshape(count, p)


def _head_tail(
    blocks: FloatArray, ufunc: np.ufunc, fill: float, n: int, finite: bool = False
) -> tuple[FloatArray, FloatArray]:
    """Partial reductions of every full window [s, s + p - 1], s = 0 .. n - p.

    ``head[s]`` reduces the window's part in the block holding s (from s to the block's end);
    ``tail[s]`` reduces its part in the following block (from that block's start to s + p - 1), or is
    ``fill`` when the window is exactly one block. ``ufunc(head, tail)`` is the window's reduction.

    For sums of all-finite data (``finite``) the suffix sums come from the prefix sums (block total -
    prefix + value: one pass instead of a reversed accumulate, error still bounded by the block). With a
    NaN or an infinity the block total would leak it into windows that do not contain it, so such data
    takes the reversed accumulate, which keeps every partial sum to the window's own values.
    """
    p = blocks.shape[1]
    prefix = ufunc.accumulate(blocks, axis=1)
    if finite and ufunc is np.add:
        suffix = (prefix[:, -1:] - prefix + blocks).reshape(-1)
    else:
        suffix = ufunc.accumulate(blocks[:, ::-1], axis=1)[:, ::-1].reshape(-1)
    head = suffix[: n - p + 1]
    tail = prefix.reshape(-1)[p - 1 : n]
    tail[::p] = fill  # windows starting on a block boundary lie in that one block: head alone
    return head, tail


def _finite_window_sums(x: FloatArray, p: int, divisor: float = 1.0) -> FloatArray:
    """Rolling sums of all-finite data divided by ``divisor`` (first p - 1 NaN), from prefix sums within
    blocks of max(p, 256); dividing the values first saves a pass (the SMA's rounding stays ~p ulp).

    A window lies in one block (prefix difference) or straddles two (the first block's total minus the
    exclusive prefix at its start, plus the second block's prefix at its end): the error stays bounded by
    the block, while blocks wider than p keep the accumulate fast for short periods. Finite data only: a
    NaN or infinity in a block would leak through the differences into windows that do not hold it.
    """
    n = x.shape[0]
    width = max(p, _SUM_BLOCK)
    count = n - p + 1
    blocks = _blocks(x, width, 0.0, divisor)
    prefix = np.add.accumulate(blocks, axis=1)
    totals = prefix[:, -1:].copy()
    prefix -= blocks
    exclusive = prefix.reshape(-1)  # the prefix sums before each value, within its block
    flat = exclusive + blocks.reshape(-1)  # ... and including it
    # One buffer for the result: p - 1 NaNs, then the sums laid out as (blocks, width) for the fix-up.
    buffer = np.empty(p - 1 + blocks.size)
    buffer[: p - 1] = np.nan
    sums = buffer[p - 1 :]
    np.subtract(flat[p - 1 : n], exclusive[:count], out=sums[:count])
    sums.reshape(-1, width)[:, width - p + 1 :] += totals  # windows that run into the next block
    return buffer[:n]


def _window_reduce(x: FloatArray, period: int, ufunc: np.ufunc, fill: float, mean: bool = False) -> FloatArray:
    """Rolling ``ufunc`` reduction (np.add, np.maximum, np.minimum); with ``mean``, sums divided by period."""
    n = x.shape[0]
    if period > n:
        return _nan(n)
    if period == 1:
        return x.copy()
    with np.errstate(all="ignore"):  # sums may overflow to inf, and inf + -inf is NaN: silently
        if ufunc is np.add and math.isfinite(float(x.sum())):  # a NaN or inf anywhere makes the sum NaN/inf
            return _finite_window_sums(x, period, period if mean else 1.0)
        out = np.empty(n)
        out[: period - 1] = np.nan
        head, tail = _head_tail(_blocks(x, period, fill), ufunc, fill, n)
        ufunc(head, tail, out=out[period - 1 :])
        if mean:
            out[period - 1 :] /= period
    return out


def _block_centres(blocks: FloatArray) -> FloatArray:
    """One finite reference value per block (its first finite value, else 0) to centre the data on."""
    centres = blocks[:, 0].copy()
    bad = ~np.isfinite(centres)
    if bad.any():
        rows = blocks[bad]
        finite = np.isfinite(rows)
        first = finite.argmax(axis=1)
        centres[bad] = np.where(finite.any(axis=1), rows[np.arange(rows.shape[0]), first], 0.0)
    return centres


def _constant_windows(x: FloatArray, p: int) -> BoolArray:
    """True for each full window whose values are all equal (exact integer count of changes)."""
    changes = np.zeros(x.shape[0], dtype=np.int64)
    np.cumsum(x[1:] != x[:-1], out=changes[1:])
    return np.asarray(changes[p - 1 :] == changes[: x.shape[0] - p + 1])


class _Windows:
    """Where each full window [s, s + p - 1] splits: n_head values in the block holding s, the rest in the
    next block. Everything depends on s % p only."""

    def __init__(self, n: int, p: int) -> None:
        self.n, self.p = n, p
        n_tail = (np.arange(n - p + 1) % p).astype(np.float64)  # values of the window in the following block
        self.n_head = p - n_tail
        self.weight = self.n_head * n_tail / p
        np.maximum(n_tail, 1.0, out=n_tail)  # a safe divisor: tail sums are 0 when the tail is empty
        self.tail_count = n_tail


class _Centred:
    """One series cut into blocks, each centred on its own reference value, with per-window partial sums."""

    def __init__(self, x: FloatArray, windows: _Windows, finite: bool) -> None:
        n, p = windows.n, windows.p
        self.deviations = _blocks(x, p, 0.0)
        centres = _block_centres(self.deviations)
        self.deviations -= centres[:, None]
        self.head, self.tail = _head_tail(self.deviations, np.add, 0.0, n, finite)
        self.head_mean = self.head / windows.n_head
        self.tail_mean = self.tail / windows.tail_count
        per_value = np.repeat(centres, p)  # the centre of the block holding each position
        self.centre_gap = per_value[: n - p + 1] - per_value[p - 1 : n]
        del per_value
        self.constant = _constant_windows(x, p)


def _comoment(a: _Centred, b: _Centred, windows: _Windows, finite: bool) -> FloatArray:
    """Sum over each full window of (a - mean a)(b - mean b); with a is b, the window's M2.

    Numerically stable: the deviations are from each block's own reference value, each window's two
    parts get their own co-moments from sums of those small deviations, and the parts are combined with
    the parallel formula of Chan, Golub and LeVeque. Exactly 0 for a window of equal values (as in
    pandas), so that a flat stretch gives a zero deviation rather than rounding noise.
    """
    result, tail = _head_tail(a.deviations * b.deviations, np.add, 0.0, windows.n, finite)
    result = result - a.head * b.head_mean
    result += tail
    result -= a.tail * b.tail_mean
    delta = a.centre_gap + a.head_mean
    delta -= a.tail_mean
    if a is b:
        delta *= delta
    else:
        delta *= b.centre_gap + b.head_mean - b.tail_mean
    delta *= windows.weight
    result += delta
    result[(a.constant | b.constant) & ~np.isnan(result)] = 0.0
    return result


def _m2(x: FloatArray, p: int) -> FloatArray:
    """Sum of squared deviations from the window mean, for each full window (n >= p)."""
    finite = bool(np.isfinite(x).all())
    windows = _Windows(x.shape[0], p)
    centred = _Centred(x, windows, finite)
    return _comoment(centred, centred, windows, finite)


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
    """Simple moving average: mean of the last ``period`` values; the first period - 1 are NaN."""
    x, p = as_series(values), _check_period(period)
    return _window_reduce(x, p, np.add, 0.0, mean=True)


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
    first valid output is at index ``period`` (it needs period changes). NaN when both averages are 0
    (no movement at all): TA-Lib says 0 there and some charting packages 100, both of which would trip a
    screen for a price that never moved.
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
        out[total == 0.0] = np.nan
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
