"""The rolling-window machinery of the indicator core: every full window of a series in O(n), whatever its length.

User scripts control the period, so nothing here may cost more than O(n) for a series of n values, whatever the
period. Rolling reductions therefore use the van Herk / Gil-Werman block decomposition (every window of length p is
a suffix of one block of p values plus a prefix of the next), which costs a few vectorised passes for any p, keeps
NaN confined to the windows that contain it (a window's partial sums hold that window's values only, unlike
differences of one long cumulative sum) and bounds rounding error by the window rather than by the series length.
Second moments (variance, covariance) are re-anchored per block: each block's values are taken relative to one of
its own values, each window's two parts get their own co-moments from those small deviations, and the parts are
merged with the parallel formula of Chan, Golub and LeVeque (the pairwise form of Welford's update). A huge level
with tiny moves (prices around 1e8 moving by 1e-3) therefore keeps full relative precision, where one running sum
of squares over the series (or pandas' add/remove Welford) loses it.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]

# Block width for sums of finite data: wide enough that accumulating along rows is fast, narrow enough
# that a block's partial sums stay close to the window's own magnitude.
_SUM_BLOCK = 256


def _nan(n: int) -> FloatArray:
    return np.full(n, np.nan)


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
