"""The indicator library: the NumPy core (shared/domain/indicators/core.py) and the script-facing ``ta`` module.

Every function is checked against an independent reference: pandas 3.1.1 (rolling/ewm, the seeded EMA
the TA-Lib convention prescribes built from ``ewm(adjust=False)``), ``statistics`` (exact rational
arithmetic, for the standard deviations pandas itself only approximates) and small cases worked by hand.
Then the contract with the sandbox: results are tuples of plain floats/bools only, invalid input gives a
plain TypeError/ValueError, hostile input costs O(n) time and bounded memory, and no NumPy object is
reachable through a result or an exception.
"""

from __future__ import annotations

import functools
import math
import statistics
import subprocess
import sys
import time
import tracemalloc
import types
import warnings
from array import array
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from shared.domain.indicators import core
from shared.domain.sandbox import ta
from shared.domain.sandbox.series import Series, series_of

NAN = math.nan
ROOT = Path(__file__).resolve().parents[2]
TA: Any = ta  # untyped handle for calls that are wrong on purpose


# ---------------------------------------------------------------------------------------------
# Data and helpers
# ---------------------------------------------------------------------------------------------


def walk(n: int, seed: int, start: float = 100.0) -> tuple[float, ...]:
    """A seeded geometric random walk, as the sandbox hands it to scripts: a tuple of Python floats."""
    rng = np.random.default_rng(seed)
    return tuple((start * np.exp(np.cumsum(rng.normal(0.0, 0.02, n)))).tolist())


N = 400
CLOSE = walk(N, 1)
OTHER = walk(N, 2, start=50.0)
_rng = np.random.default_rng(3)
HIGH = tuple((np.array(CLOSE) * (1 + np.abs(_rng.normal(0, 0.01, N)))).tolist())
LOW = tuple((np.array(CLOSE) * (1 - np.abs(_rng.normal(0, 0.01, N)))).tolist())


def check(actual: Sequence[float], expected: Any, rtol: float = 1e-12, atol: float = 0.0) -> None:
    """Same length, NaN exactly where expected, values within tolerance."""
    assert type(actual) in (Series, tuple, array)  # a Series, a tuple of bools, or a slice of a Series
    expected_array = np.asarray(expected, dtype=np.float64)
    assert len(actual) == len(expected_array)
    np.testing.assert_array_equal(np.isnan(actual), np.isnan(expected_array))
    np.testing.assert_allclose(actual, expected_array, rtol=rtol, atol=atol, equal_nan=True)


def same(a: object, b: object) -> bool:
    """Equal, NaN included (tuple == tuple is False for two distinct NaN objects)."""
    return np.array_equal(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64), equal_nan=True)


def seeded_ewm(values: Sequence[float], period: int, alpha: float) -> np.ndarray:
    """TA-Lib-style smoothing from pandas: the first output is the SMA of the first ``period`` values,
    then ewm(adjust=False) (y = (1 - alpha) y + alpha x). Leading NaNs are skipped."""
    x = np.asarray(values, dtype=np.float64)
    out = np.full(x.size, np.nan)
    valid = np.flatnonzero(~np.isnan(x))
    if valid.size == 0 or valid[0] + period > x.size:
        return out
    start = int(valid[0])
    tail = pd.Series(x[start + period - 1 :].copy())
    tail.iloc[0] = x[start : start + period].mean()
    out[start + period - 1 :] = tail.ewm(alpha=alpha, adjust=False).mean().to_numpy()
    return out


def exact_rolling(values: Sequence[float], period: int, func: Callable[[list[float]], float]) -> list[float]:
    """``func`` of each full window (``statistics`` computes with exact fractions)."""
    return [NAN] * (period - 1) + [func(list(values[i - period + 1 : i + 1])) for i in range(period - 1, len(values))]


def plain(value: object) -> bool:
    """Only read-only float series (their items are plain floats), tuples, floats and bools (exact types:
    numpy.float64 is a float subclass) all the way down."""
    if type(value) is Series:
        return all(type(item) is float for item in value)
    if type(value) is tuple:
        return all(plain(item) for item in value)
    return type(value) in (float, bool)


# ---------------------------------------------------------------------------------------------
# Against pandas
# ---------------------------------------------------------------------------------------------

PERIODS = [1, 2, 3, 14, 20, 50, N - 1, N, N + 1]


@pytest.mark.parametrize("period", PERIODS)
def test_sma_and_rolling_reductions_match_pandas(period: int) -> None:
    s = pd.Series(CLOSE)
    check(ta.sma(CLOSE, period), s.rolling(period).mean())
    check(ta.rolling_sum(CLOSE, period), s.rolling(period).sum())
    check(ta.rolling_max(CLOSE, period), s.rolling(period).max(), rtol=0)
    check(ta.rolling_min(CLOSE, period), s.rolling(period).min(), rtol=0)
    check(ta.highest(CLOSE, period), s.rolling(period).max(), rtol=0)
    check(ta.lowest(CLOSE, period), s.rolling(period).min(), rtol=0)


@pytest.mark.parametrize("period", [2, 7, 255, 256, 257, 700, 2999])
def test_sums_across_many_blocks_match_pandas(period: int) -> None:
    """Finite data is summed in blocks of max(period, 256): windows inside one block and across two."""
    long = walk(3000, 4)
    s = pd.Series(long)
    check(ta.rolling_sum(long, period), s.rolling(period).sum())
    check(ta.sma(long, period), s.rolling(period).mean())
    holed = (*long[:1500], NAN, *long[1501:])  # the exact path for data with NaN
    check(ta.sma(holed, period), pd.Series(holed).rolling(period).mean())


@pytest.mark.parametrize("period", [1, 2, 3, 10, 30, 101])
def test_wma_matches_pandas_weighted_windows(period: int) -> None:
    weights = np.arange(1, period + 1, dtype=np.float64)
    expected = pd.Series(CLOSE).rolling(period).apply(lambda w: np.dot(w, weights) / weights.sum(), raw=True)
    check(ta.wma(CLOSE, period), expected)


@pytest.mark.parametrize("period", [1, 2, 3, 9, 12, 26, 200, N, N + 1])
def test_ema_and_wilder_match_seeded_pandas_ewm(period: int) -> None:
    check(ta.ema(CLOSE, period), seeded_ewm(CLOSE, period, 2.0 / (period + 1)))
    check(ta.wilder(CLOSE, period), seeded_ewm(CLOSE, period, 1.0 / period))


def test_ema_closed_form_holds_over_many_blocks() -> None:
    """Period 2 (alpha 2/3) forces a new block every ~189 values: 20,000 values cross ~100 block joins."""
    long = walk(20_000, 7)
    check(ta.ema(long, 2), seeded_ewm(long, 2, 2.0 / 3.0))
    check(ta.wilder(long, 2), seeded_ewm(long, 2, 0.5))
    check(ta.ema(long, 5000), seeded_ewm(long, 5000, 2.0 / 5001.0), rtol=1e-10)


@pytest.mark.parametrize("level", [1e-300, 1e-5, 1e250, 1e300])
def test_ema_keeps_its_accuracy_at_extreme_magnitudes(level: float) -> None:
    """The closed form multiplies by up to 2**300: huge series are rescaled (exactly) rather than overflow."""
    values = tuple(v * level / 100.0 for v in CLOSE)
    check(ta.ema(values, 3), seeded_ewm(values, 3, 0.5))
    check(ta.wilder(values, 14), seeded_ewm(values, 14, 1.0 / 14))
    assert all(math.isfinite(v) for v in ta.ema(values, 3)[2:])


@pytest.mark.parametrize("period", [1, 2, 14, 50])
def test_rsi_matches_pandas_wilder_rsi(period: int) -> None:
    s = pd.Series(CLOSE)
    delta = s.diff()
    gain = seeded_ewm(delta.clip(lower=0).to_numpy(), period, 1.0 / period)
    loss = seeded_ewm((-delta).clip(lower=0).to_numpy(), period, 1.0 / period)
    expected = 100.0 * gain / (gain + loss)
    check(ta.rsi(CLOSE, period), expected)
    assert all(math.isnan(v) for v in ta.rsi(CLOSE, period)[:period])
    assert not math.isnan(ta.rsi(CLOSE, period)[period])


@pytest.mark.parametrize("period", [1, 5, 14])
def test_true_range_and_atr_match_pandas(period: int) -> None:
    h, lo, c = pd.Series(HIGH), pd.Series(LOW), pd.Series(CLOSE)
    prev = c.shift(1)
    tr = pd.concat([h - lo, (h - prev).abs(), (lo - prev).abs()], axis=1).max(axis=1, skipna=False)
    check(ta.true_range(HIGH, LOW, CLOSE), tr)
    check(ta.atr(HIGH, LOW, CLOSE, period), seeded_ewm(tr.to_numpy(), period, 1.0 / period))
    assert math.isnan(ta.atr(HIGH, LOW, CLOSE, period)[period - 1])
    assert not math.isnan(ta.atr(HIGH, LOW, CLOSE, period)[period])


@pytest.mark.parametrize(("fast", "slow", "signal"), [(12, 26, 9), (3, 10, 4), (1, 2, 1)])
def test_macd_matches_pandas(fast: int, slow: int, signal: int) -> None:
    line = seeded_ewm(CLOSE, fast, 2.0 / (fast + 1)) - seeded_ewm(CLOSE, slow, 2.0 / (slow + 1))
    sig = seeded_ewm(line, signal, 2.0 / (signal + 1))
    got_line, got_signal, got_hist = ta.macd(CLOSE, fast, slow, signal)
    # The line is a difference of two EMAs near 100 that crosses 0: compare with an absolute tolerance.
    check(got_line, line, atol=1e-11)
    check(got_signal, sig, atol=1e-11)
    check(got_hist, line - sig, atol=1e-11)
    assert not math.isnan(got_line[slow - 1]) and math.isnan(got_line[slow - 2])
    assert not math.isnan(got_signal[slow + signal - 2]) and math.isnan(got_signal[slow + signal - 3])


@pytest.mark.parametrize(("period", "ddof"), [(2, 0), (3, 1), (20, 0), (20, 1), (100, 0), (N, 1)])
def test_stdev_matches_exact_statistics_and_pandas(period: int, ddof: int) -> None:
    exact = exact_rolling(CLOSE, period, statistics.pstdev if ddof == 0 else statistics.stdev)
    check(ta.stdev(CLOSE, period, ddof=ddof), exact, rtol=1e-11)
    # pandas' add/remove rolling variance is itself off by up to ~1e-8 relative on short windows
    # (measured against the exact values above), hence the looser tolerance for it.
    check(ta.stdev(CLOSE, period, ddof=ddof), pd.Series(CLOSE).rolling(period).std(ddof=ddof), rtol=1e-6)


def test_stdev_is_accurate_for_a_large_level_with_tiny_moves() -> None:
    """Sum-of-squares formulas lose every digit here (variance 1e-8 against values of 1e6)."""
    rng = np.random.default_rng(5)
    values = tuple((1e6 + np.cumsum(rng.normal(0.0, 1e-4, 300))).tolist())
    check(ta.stdev(values, 20), exact_rolling(values, 20, statistics.pstdev), rtol=1e-10)


@pytest.mark.parametrize(("period", "k"), [(20, 2.0), (10, 1.5), (5, 0)])
def test_bollinger_is_sma_plus_minus_k_population_stdev(period: int, k: float) -> None:
    s = pd.Series(CLOSE)
    middle = s.rolling(period).mean()
    exact_sd = np.asarray(exact_rolling(CLOSE, period, statistics.pstdev))
    upper, mid, lower = ta.bollinger(CLOSE, period, k)
    check(mid, middle)
    check(upper, middle + k * exact_sd)
    check(lower, middle - k * exact_sd)
    check(upper, middle + k * s.rolling(period).std(ddof=0), rtol=1e-9)


def test_bollinger_defaults_are_20_and_2() -> None:
    assert same(ta.bollinger(CLOSE), ta.bollinger(CLOSE, 20, 2.0))
    assert not same(ta.bollinger(CLOSE), ta.bollinger(CLOSE, 20, 2.5))


@pytest.mark.parametrize(("period", "ddof"), [(5, 0), (20, 0), (20, 1)])
def test_zscore(period: int, ddof: int) -> None:
    s = pd.Series(CLOSE)
    sd = np.asarray(exact_rolling(CLOSE, period, statistics.pstdev if ddof == 0 else statistics.stdev))
    check(ta.zscore(CLOSE, period, ddof), (s - s.rolling(period).mean()) / sd, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("period", [2, 3, 10, 60, N])
def test_correlation_matches_exact_statistics_and_pandas(period: int) -> None:
    exact = [NAN] * (period - 1) + [
        statistics.correlation(list(CLOSE[i - period + 1 : i + 1]), list(OTHER[i - period + 1 : i + 1]))
        for i in range(period - 1, N)
    ]
    check(ta.correlation(CLOSE, OTHER, period), exact, rtol=0, atol=1e-12)
    check(ta.correlation(CLOSE, OTHER, period), pd.Series(CLOSE).rolling(period).corr(pd.Series(OTHER)), atol=1e-7)


@pytest.mark.parametrize("periods", [1, 5, N - 1, N])
def test_returns_match_pandas(periods: int) -> None:
    s = pd.Series(CLOSE)
    check(ta.pct_change(CLOSE, periods), s.pct_change(periods))
    check(ta.log_returns(CLOSE, periods), np.log(s / s.shift(periods)))


def test_drawdown_matches_pandas() -> None:
    s = pd.Series(CLOSE)
    check(ta.drawdown(CLOSE), s / s.cummax() - 1.0)
    assert max(ta.drawdown(CLOSE)) == 0.0


def test_crosses_match_pandas_comparisons() -> None:
    fast, slow = pd.Series(ta.sma(CLOSE, 5)), pd.Series(ta.sma(CLOSE, 20))
    over = ((fast > slow) & (fast.shift(1) <= slow.shift(1))).tolist()
    under = ((fast < slow) & (fast.shift(1) >= slow.shift(1))).tolist()
    assert ta.crossover(tuple(fast), tuple(slow)) == tuple(over)
    assert ta.crossunder(tuple(fast), tuple(slow)) == tuple(under)
    assert any(over) and any(under)


# ---------------------------------------------------------------------------------------------
# Small cases worked by hand (warm-up positions included)
# ---------------------------------------------------------------------------------------------


def test_hand_computed_moving_averages() -> None:
    check(ta.sma((1.0, 2.0, 3.0, 4.0, 5.0), 3), [NAN, NAN, 2.0, 3.0, 4.0])
    # alpha = 0.5, seed = mean(2, 4, 6) = 4, then 4 + 0.5 (8 - 4) = 6, 6 + 0.5 (12 - 6) = 9
    check(ta.ema((2.0, 4.0, 6.0, 8.0, 12.0), 3), [NAN, NAN, 4.0, 6.0, 9.0])
    # weights 1, 2, 3 over 6: (1 + 4 + 9) / 6 and (2 + 6 + 12) / 6
    check(ta.wma((1.0, 2.0, 3.0, 4.0), 3), [NAN, NAN, 14 / 6, 20 / 6])
    # alpha = 1/3, seed = mean(3, 6, 9) = 6, then 6 + (12 - 6) / 3 = 8
    check(ta.wilder((3.0, 6.0, 9.0, 12.0), 3), [NAN, NAN, 6.0, 8.0])
    check(ta.rolling_sum((1.0, 2.0, 3.0, 4.0), 2), [NAN, 3.0, 5.0, 7.0])
    check(ta.rolling_max((1.0, 5.0, 3.0, 2.0, 1.0), 3), [NAN, NAN, 5.0, 5.0, 3.0])
    check(ta.rolling_min((4.0, 5.0, 3.0, 6.0, 7.0), 2), [NAN, 4.0, 3.0, 3.0, 6.0])


def test_hand_computed_rsi() -> None:
    # changes +1, -1, +1, +1; seeds: gain (1 + 0) / 2, loss (0 + 1) / 2 -> 50; then Wilder:
    # gain (0.5 + 1) / 2 = 0.75, loss 0.25 -> 75; gain 0.875, loss 0.125 -> 87.5
    check(ta.rsi((1.0, 2.0, 1.0, 2.0, 3.0), 2), [NAN, NAN, 50.0, 75.0, 87.5])
    check(ta.rsi((1.0, 2.0, 3.0, 4.0), 2), [NAN, NAN, 100.0, 100.0])  # no loss at all
    check(ta.rsi((5.0, 4.0, 3.0), 2), [NAN, NAN, 0.0])  # no gain at all
    check(ta.rsi((5.0, 5.0, 5.0, 5.0), 2), [NAN, NAN, 50.0, 50.0])  # never moved: 50, as the engine says


def test_hand_computed_true_range_and_atr() -> None:
    high, low, close = (10.0, 11.0, 12.0, 11.0), (9.0, 10.0, 10.0, 9.0), (9.5, 10.5, 11.0, 10.0)
    # TR: max(1, 1.5, 0.5) = 1.5; max(2, 1.5, 0.5) = 2; max(2, 0, 2) = 2
    check(ta.true_range(high, low, close), [NAN, 1.5, 2.0, 2.0])
    # ATR(2): seed (1.5 + 2) / 2 = 1.75, then (1.75 + 2) / 2 = 1.875
    check(ta.atr(high, low, close, 2), [NAN, NAN, 1.75, 1.875])


def test_hand_computed_macd() -> None:
    # On a straight line EMA(2) = x - 0.5 (from index 1) and EMA(3) = x - 1 (from index 2): the line is
    # 0.5 from index 2, its EMA(2) 0.5 from index 3, the histogram 0.
    line, signal, hist = ta.macd((1.0, 2.0, 3.0, 4.0, 5.0, 6.0), 2, 3, 2)
    check(line, [NAN, NAN, 0.5, 0.5, 0.5, 0.5])
    check(signal, [NAN, NAN, NAN, 0.5, 0.5, 0.5])
    check(hist, [NAN, NAN, NAN, 0.0, 0.0, 0.0], atol=1e-15)


def test_hand_computed_dispersion() -> None:
    sample = (2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0)  # the textbook population stdev of 2
    assert ta.stdev(sample, 8)[-1] == pytest.approx(2.0, rel=1e-15)
    assert ta.stdev(sample, 8, ddof=1)[-1] == pytest.approx(math.sqrt(32 / 7), rel=1e-15)
    upper, middle, lower = ta.bollinger((1.0, 2.0, 3.0), 3, 2)
    check(middle, [NAN, NAN, 2.0])
    check(upper, [NAN, NAN, 2.0 + 2 * math.sqrt(2 / 3)])
    check(lower, [NAN, NAN, 2.0 - 2 * math.sqrt(2 / 3)])
    check(ta.zscore((1.0, 2.0, 3.0), 3), [NAN, NAN, 1 / math.sqrt(2 / 3)])
    check(ta.correlation((1.0, 2.0, 3.0, 5.0), (3.0, 2.0, 1.0, -1.0), 3), [NAN, NAN, -1.0, -1.0])


def test_flat_windows_have_zero_spread_and_undefined_zscore_and_correlation() -> None:
    flat = (7.25,) * 5 + (7.5, 7.0) + (3.1,) * 6
    sd = ta.stdev(flat, 4)
    assert sd[3] == 0.0 and sd[4] == 0.0 and sd[-1] == 0.0  # exactly 0, not rounding noise
    assert sd[6] > 0.0
    z = ta.zscore(flat, 4)
    assert math.isnan(z[4]) and math.isnan(z[-1]) and not math.isnan(z[6])
    upper, middle, lower = ta.bollinger(flat, 4)
    assert upper[-1] == middle[-1] == lower[-1] == pytest.approx(3.1, rel=1e-15)
    assert math.isnan(ta.correlation(flat, tuple(range(13)), 4)[-1])


def test_hand_computed_returns_drawdown_and_crosses() -> None:
    check(ta.pct_change((100.0, 110.0, 99.0)), [NAN, 0.1, -0.1])
    check(ta.pct_change((100.0, 110.0, 99.0), 2), [NAN, NAN, -0.01])
    check(ta.log_returns((1.0, math.e, 1.0)), [NAN, 1.0, -1.0])
    check(ta.drawdown((100.0, 120.0, 90.0, 130.0, 65.0)), [0.0, 0.0, -0.25, 0.0, -0.5])
    assert ta.crossover((1.0, 3.0, 2.0, 4.0), (2.0, 2.0, 2.0, 2.0)) == (False, True, False, True)
    assert ta.crossover((1.0, 3.0, 2.0, 4.0), 2.0) == (False, True, False, True)
    assert ta.crossover((1.0, 2.0, 3.0), 2) == (False, False, True)  # touching is not crossing
    assert ta.crossunder((3.0, 1.0, 3.0, 1.0), 2.0) == (False, True, False, True)
    assert ta.crossunder((3.0, 2.0, 1.0), 2) == (False, False, True)


def test_zero_and_negative_values_follow_ieee_arithmetic() -> None:
    pct = ta.pct_change((0.0, 1.0, 0.0, 0.0))
    assert pct[1] == math.inf and pct[2] == -1.0 and math.isnan(pct[3])
    logs = ta.log_returns((1.0, 0.0, 1.0, -1.0))
    assert logs[1] == -math.inf and logs[2] == math.inf and math.isnan(logs[3])
    assert all(math.isnan(v) for v in ta.drawdown((-1.0, -2.0, 0.0)))  # peak <= 0: meaningless
    check(ta.drawdown((-1.0, 2.0, 1.0)), [NAN, 0.0, -0.5])


# ---------------------------------------------------------------------------------------------
# NaN propagation
# ---------------------------------------------------------------------------------------------

WINDOW_FUNCTIONS: dict[str, Callable[[tuple[float, ...], int], Sequence[float]]] = {
    "sma": ta.sma,
    "wma": ta.wma,
    "rolling_sum": ta.rolling_sum,
    "rolling_max": ta.rolling_max,
    "rolling_min": ta.rolling_min,
    "stdev": ta.stdev,
    "zscore": ta.zscore,
    "correlation": lambda values, period: ta.correlation(values, OTHER[: len(values)], period),
    "bollinger_upper": lambda values, period: ta.bollinger(values, period)[0],
}


@pytest.mark.parametrize("name", sorted(WINDOW_FUNCTIONS))
@pytest.mark.parametrize("period", [1, 3, 7, 20])
def test_window_functions_confine_nan_to_the_windows_holding_it(name: str, period: int) -> None:
    func = WINDOW_FUNCTIONS[name]
    holes = {10, 11, 40, 41 + period}  # two adjacent, one alone, one just after the second window
    values = tuple(NAN if i in holes else v for i, v in enumerate(CLOSE[:100]))
    got, clean = func(values, period), func(CLOSE[:100], period)
    for i in range(100):
        touched = any(i - period < h <= i for h in holes)
        if touched:
            assert math.isnan(got[i]), (name, i)
        elif name == "zscore" and math.isnan(clean[i]):
            continue
        else:
            assert got[i] == pytest.approx(clean[i], rel=1e-9, abs=1e-12, nan_ok=True), (name, i)


def test_window_nan_matches_pandas_min_periods_semantics() -> None:
    values = tuple(NAN if i % 37 == 5 else v for i, v in enumerate(CLOSE))
    s = pd.Series(values)
    check(ta.sma(values, 10), s.rolling(10).mean())
    check(ta.rolling_max(values, 10), s.rolling(10).max(), rtol=0)
    check(ta.stdev(values, 10), s.rolling(10).std(ddof=0), rtol=1e-6)
    check(ta.correlation(values, OTHER, 10), s.rolling(10).corr(pd.Series(OTHER)), atol=1e-7)


def test_infinities_stay_inside_their_windows() -> None:
    values = list(CLOSE[:60])
    values[20], values[30] = math.inf, -math.inf
    got = ta.sma(values, 5)
    assert all(got[i] == math.inf for i in range(20, 25))
    assert all(got[i] == -math.inf for i in range(30, 35))
    assert got[25:30] == pytest.approx(ta.sma(CLOSE[:60], 5)[25:30], rel=1e-12)
    assert got[40:] == pytest.approx(ta.sma(CLOSE[:60], 5)[40:], rel=1e-12)
    values[31] = math.inf
    assert math.isnan(ta.sma(values, 5)[32])  # inf + -inf in one window


RECURSIVE: dict[str, Callable[[tuple[float, ...]], Sequence[float]]] = {
    "ema": lambda v: ta.ema(v, 5),
    "wilder": lambda v: ta.wilder(v, 5),
    "rsi": lambda v: ta.rsi(v, 5),
    "macd_line": lambda v: ta.macd(v, 3, 6, 4)[0],
    "macd_signal": lambda v: ta.macd(v, 3, 6, 4)[1],
    "drawdown": ta.drawdown,
}


@pytest.mark.parametrize("name", sorted(RECURSIVE))
def test_recursive_functions_skip_leading_nan_and_are_poisoned_by_later_nan(name: str) -> None:
    func = RECURSIVE[name]
    base = CLOSE[:80]
    shifted = func((NAN,) * 7 + base)
    assert all(math.isnan(v) for v in shifted[:7])
    check(shifted[7:], func(base), rtol=1e-12)  # the warm-up starts at the first non-NaN value
    holed = func((*base[:40], NAN, *base[41:]))
    check(holed[:40], func(base)[:40], rtol=0)
    assert all(math.isnan(v) for v in holed[40:])


def test_nan_in_the_seed_window_poisons_the_whole_recursion() -> None:
    assert all(math.isnan(v) for v in ta.ema((1.0, NAN, 3.0, 4.0, 5.0, 6.0), 3))


def test_recursive_indicators_chain_on_each_others_warm_up() -> None:
    smoothed_rsi = ta.ema(ta.rsi(CLOSE, 14), 5)
    assert all(math.isnan(v) for v in smoothed_rsi[: 14 + 4])
    check(smoothed_rsi[18:], ta.ema(ta.rsi(CLOSE, 14)[14:], 5)[4:], rtol=0)
    atr_sma = ta.sma(ta.atr(HIGH, LOW, CLOSE, 14), 10)
    assert math.isnan(atr_sma[22]) and not math.isnan(atr_sma[23])


def test_atr_with_true_range_nan_in_the_middle() -> None:
    high = list(HIGH[:50])
    high[30] = NAN
    got = ta.atr(high, LOW[:50], CLOSE[:50], 5)
    check(got[:30], ta.atr(HIGH[:50], LOW[:50], CLOSE[:50], 5)[:30], rtol=0)
    assert all(math.isnan(v) for v in got[30:])


def test_returns_and_crosses_with_nan() -> None:
    values = (1.0, 2.0, NAN, 4.0, 5.0)
    check(ta.pct_change(values), [NAN, 1.0, NAN, NAN, 0.25])
    assert ta.crossover((1.0, 3.0, NAN, 1.0, 3.0), 2.0) == (False, True, False, False, True)
    assert ta.crossover((1.0, NAN, 3.0), 2.0) == (False, False, False)
    assert ta.crossover((1.0, 3.0), NAN) == (False, False)


# ---------------------------------------------------------------------------------------------
# Edge lengths
# ---------------------------------------------------------------------------------------------


def all_calls(values: tuple[float, ...]) -> dict[str, Callable[[], object]]:
    """Every public function, called on ``values`` with typical arguments."""
    other = tuple(reversed(values))
    return {
        "sma": lambda: ta.sma(values, 3),
        "ema": lambda: ta.ema(values, 3),
        "wma": lambda: ta.wma(values, 3),
        "wilder": lambda: ta.wilder(values, 3),
        "rsi": lambda: ta.rsi(values, 3),
        "macd": lambda: ta.macd(values, 2, 4, 2),
        "bollinger": lambda: ta.bollinger(values, 3, 2.0),
        "true_range": lambda: ta.true_range(values, values, values),
        "atr": lambda: ta.atr(values, values, values, 3),
        "stdev": lambda: ta.stdev(values, 3, 1),
        "zscore": lambda: ta.zscore(values, 3),
        "pct_change": lambda: ta.pct_change(values, 2),
        "log_returns": lambda: ta.log_returns(values, 2),
        "rolling_sum": lambda: ta.rolling_sum(values, 3),
        "rolling_max": lambda: ta.rolling_max(values, 3),
        "rolling_min": lambda: ta.rolling_min(values, 3),
        "highest": lambda: ta.highest(values, 3),
        "lowest": lambda: ta.lowest(values, 3),
        "crossover": lambda: ta.crossover(values, other),
        "crossunder": lambda: ta.crossunder(values, 2.0),
        "correlation": lambda: ta.correlation(values, other, 3),
        "drawdown": lambda: ta.drawdown(values),
    }


def test_every_public_function_is_exercised_here() -> None:
    assert set(all_calls(())) == set(ta.__all__)


@pytest.mark.parametrize("length", [0, 1, 2, 3, 5, 40])
@pytest.mark.parametrize("name", sorted(ta.__all__))
def test_every_result_is_a_plain_series_or_tuple_of_bools(name: str, length: int) -> None:
    values = tuple(float(v) for v in CLOSE[:length])
    result: Any = all_calls(values)[name]()
    assert plain(result), (name, result)
    parts = result if name in ("macd", "bollinger") else (result,)
    assert len(parts) in (1, 3)
    for part in parts:
        assert type(part) is (tuple if name in ("crossover", "crossunder") else Series) and len(part) == length


@pytest.mark.parametrize("name", sorted(ta.__all__))
def test_extreme_inputs_give_plain_results_and_no_warnings(name: str) -> None:
    """NumPy's floating-point warnings are silenced in the core: with warnings turned into errors (a
    filter a script's host might set) overflow, 0/0 and inf - inf still give IEEE results."""
    extreme = (1.0, NAN, math.inf, -math.inf, 0.0, -0.0, 2.0, 1e308, -1e308, 5e-324, 3.0, 4.0)
    huge = (1e308, 1.7e308, 1e308, -1e308, 1e308, 0.0, 0.0, 0.0, 1e-308, -1e-308)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert plain(all_calls(extreme)[name]())
        assert plain(all_calls(huge)[name]())


def test_shorter_than_the_period_is_all_nan_of_the_input_length() -> None:
    short = CLOSE[:4]
    for result in (ta.sma(short, 5), ta.ema(short, 5), ta.wma(short, 5), ta.stdev(short, 5), ta.rsi(short, 4)):
        assert len(result) == 4 and all(math.isnan(v) for v in result)
    assert len(ta.sma((), 5)) == 0 and [len(part) for part in ta.macd(())] == [0, 0, 0]
    assert len(ta.drawdown(())) == len(ta.correlation((), (), 3)) == 0 and ta.crossover((), 1.0) == ()


def test_period_one_is_the_identity_where_it_should_be() -> None:
    for func in (ta.sma, ta.ema, ta.wma, ta.wilder, ta.rolling_sum, ta.rolling_max, ta.rolling_min):
        assert tuple(func(CLOSE, 1)) == CLOSE
    assert tuple(ta.stdev(CLOSE, 1)) == (0.0,) * N


def test_lists_and_ints_are_accepted_like_tuples_of_floats() -> None:
    ints = [1, 2, 3, 4, 5]
    assert same(ta.sma(ints, 2), ta.sma((1.0, 2.0, 3.0, 4.0, 5.0), 2))
    assert same(ta.sma(list(CLOSE), 10), ta.sma(CLOSE, 10))
    assert same(ta.atr(list(HIGH), LOW, list(CLOSE)), ta.atr(HIGH, LOW, CLOSE))
    assert tuple(ta.sma([10**300, 1], 1)) == (1e300, 1.0)


# ---------------------------------------------------------------------------------------------
# Validation: plain TypeError / ValueError with plain messages
# ---------------------------------------------------------------------------------------------


class Floaty:
    """Hostile items: conversion hooks that must never be called (they record it, then lie)."""

    calls: list[str] = []

    def __float__(self) -> float:
        Floaty.calls.append("__float__")
        return 1.0

    def __index__(self) -> int:
        Floaty.calls.append("__index__")
        return 1

    def __len__(self) -> int:
        Floaty.calls.append("__len__")
        return 10**12


class FloatSubclass(float):
    def __float__(self) -> float:
        Floaty.calls.append("FloatSubclass.__float__")
        return 2.0


class IntSubclass(int):
    def __index__(self) -> int:
        Floaty.calls.append("IntSubclass.__index__")
        return 2


BAD_SERIES = [
    ("abc", TypeError, "values must be a series, tuple or list of numbers, not str"),
    (None, TypeError, "not NoneType"),
    (range(5), TypeError, "not range"),
    (np.arange(5.0), TypeError, "not ndarray"),
    (iter([1.0, 2.0]), TypeError, "not list_iterator"),
    ({1.0: 2.0}, TypeError, "not dict"),
    ((1.0, "2", 3.0), TypeError, r"values\[1\] must be a float or an int, not str"),
    ((1.0, 2.0, True), TypeError, r"values\[2\] must be a float or an int, not bool"),
    ([1.0, None], TypeError, r"values\[1\] must be a float or an int, not NoneType"),
    ((1.0, 1j), TypeError, "not complex"),
    ((1.0, (2.0,)), TypeError, "not tuple"),
    ((1.0, np.float64(2.0)), TypeError, "not float64"),
    ((Floaty(),), TypeError, "not Floaty"),
    ((FloatSubclass(1.0),), TypeError, "not FloatSubclass"),
    ([2, IntSubclass(3)], TypeError, "not IntSubclass"),
    ((1.0, 10**400), ValueError, r"values\[1\] is an int too large for a float"),
    ([0.0] * 1_000_001, ValueError, "has 1,000,001 values; at most 1,000,000 are allowed"),
]


@pytest.mark.parametrize(("values", "error", "message"), BAD_SERIES)
def test_invalid_series_are_refused_without_touching_their_items(values: object, error: type, message: str) -> None:
    Floaty.calls.clear()
    with pytest.raises(error, match=message) as info:
        TA.sma(values, 3)
    assert Floaty.calls == []
    assert_plain_exception(info.value)


BAD_PERIODS = [
    (0, ValueError, "period must be between 1 and 1,000,000, got 0"),
    (-3, ValueError, "got -3"),
    (1_000_001, ValueError, "period must be between 1 and 1,000,000, got 1000001"),
    (10**100, ValueError, r"period must be between 1 and 1,000,000$"),
    pytest.param(10**5000, ValueError, r"between 1 and 1,000,000$", id="10**5000"),  # too long for str()
    (2.0, TypeError, "period must be an int, not float"),
    ("3", TypeError, "not str"),
    (True, TypeError, "not bool"),
    (None, TypeError, "not NoneType"),
    (IntSubclass(3), TypeError, "not IntSubclass"),
    (np.int64(3), TypeError, "not int64"),
]


@pytest.mark.parametrize(("period", "error", "message"), BAD_PERIODS)
def test_invalid_periods_are_refused(period: object, error: type, message: str) -> None:
    for func in (TA.sma, TA.ema, TA.rsi, TA.stdev, TA.rolling_max, TA.wma):
        with pytest.raises(error, match=message) as info:
            func(CLOSE, period)
        assert_plain_exception(info.value)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: TA.atr(HIGH, LOW[:-1], CLOSE), ValueError, r"high, low and close must have the same length \(got 400"),
        (lambda: TA.true_range(HIGH, LOW, CLOSE[1:]), ValueError, "must have the same length"),
        (
            lambda: TA.correlation(CLOSE, OTHER[:10], 5),
            ValueError,
            r"a and b must have the same length \(got 400 and 10\)",
        ),
        (lambda: TA.crossover(CLOSE, OTHER[:3]), ValueError, "a and b must have the same length"),
        (
            lambda: TA.crossover(CLOSE, "2"),
            TypeError,
            "b must be a series, tuple or list of numbers, or a number, not str",
        ),
        (lambda: TA.crossunder(CLOSE, True), TypeError, "not bool"),
        (lambda: TA.crossunder(CLOSE, 10**400), ValueError, "b is an int too large for a float"),
        (lambda: TA.stdev(CLOSE, 5, 5), ValueError, "ddof must be between 0 and 4, got 5"),
        (lambda: TA.stdev(CLOSE, 5, -1), ValueError, "ddof must be between 0 and 4"),
        (lambda: TA.stdev(CLOSE, 5, 1.0), TypeError, "ddof must be an int, not float"),
        (lambda: TA.zscore(CLOSE, 1, 1), ValueError, "ddof must be between 0 and 0"),
        (lambda: TA.macd(CLOSE, 26, 12), ValueError, r"fast \(26\) must be shorter than slow \(12\)"),
        (lambda: TA.macd(CLOSE, 12, 26, 0), ValueError, "signal must be between 1"),
        (lambda: TA.bollinger(CLOSE, 20, -1.0), ValueError, "k must be a finite number between 0 and 1,000,000"),
        (lambda: TA.bollinger(CLOSE, 20, math.nan), ValueError, "k must be a finite number"),
        (lambda: TA.bollinger(CLOSE, 20, math.inf), ValueError, "k must be a finite number"),
        (lambda: TA.bollinger(CLOSE, 20, True), TypeError, "k must be a float or an int, not bool"),
        (lambda: TA.pct_change(CLOSE, 0), ValueError, "periods must be between 1"),
        (lambda: TA.log_returns(CLOSE, 1.5), TypeError, "periods must be an int"),
        (lambda: TA.drawdown(CLOSE, 3), TypeError, "positional argument"),
    ],
)
def test_invalid_arguments_are_refused(call: Callable[[], object], error: type, message: str) -> None:
    with pytest.raises(error, match=message) as info:
        call()
    assert_plain_exception(info.value)


def assert_plain_exception(exc: BaseException) -> None:
    """A builtin exception whose args are plain strs without NumPy reprs, chained to nothing."""
    assert type(exc) in (TypeError, ValueError, MemoryError, RuntimeError)
    assert all(type(arg) is str for arg in exc.args)
    for word in ("numpy", "np.", "array(", "dtype", "float64("):
        assert all(word not in arg for arg in exc.args), exc.args
    assert exc.__cause__ is None
    assert exc.__context__ is None
    assert set(vars(exc)) <= {"__notes__"}  # no attributes beyond the builtin ones


def test_messages_name_the_function_that_refused() -> None:
    with pytest.raises(TypeError, match=r"^ta\.rsi\(\): period must be an int"):
        TA.rsi(CLOSE, "14")


def test_a_numpy_failure_in_the_core_reaches_scripts_as_a_plain_exception() -> None:
    """The guard around every core call: NumPy's own exceptions (MemoryError subclasses carrying a dtype,
    ValueErrors with array reprs) are replaced, not wrapped."""
    with pytest.raises(MemoryError, match=r"^ta\.sma\(\): not enough memory for this input$") as info:
        ta._run("sma", lambda: np.empty(10**15))  # NumPy's _ArrayMemoryError, with .dtype and .shape
    assert_plain_exception(info.value)
    with pytest.raises(RuntimeError, match=r"^ta\.ema\(\): internal error \(ValueError\)$") as bug:
        ta._run("ema", lambda: np.ones(3) + np.ones(4))
    assert_plain_exception(bug.value)
    with pytest.raises(RuntimeError, match=r"internal error \(AxisError\)") as many:
        ta._run_many("macd", lambda: (np.ones(3).sum(axis=2),))
    assert_plain_exception(many.value)


def test_out_of_memory_inside_the_core_is_a_plain_memory_error() -> None:
    """A real address-space limit (as in the sandbox) hit inside NumPy, in a child process."""
    script = """
import resource, sys
from shared.domain.sandbox import ta
from shared.domain.sandbox.series import Series, series_of
values = tuple(float(i % 97) for i in range(1_000_000))
ta.sma(values[:100], 5)
with open("/proc/self/status") as status:
    vm = next(int(line.split()[1]) for line in status if line.startswith("VmSize:")) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + 40 * 2**20, resource.RLIM_INFINITY))
try:
    ta.correlation(values, values, 50)
except MemoryError as exc:
    assert type(exc) is MemoryError, type(exc)
    assert exc.__context__ is None and exc.__cause__ is None
    print("MemoryError:", exc.args[0])
else:
    print("no error")
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "MemoryError: ta.correlation(): not enough memory for this input"


# ---------------------------------------------------------------------------------------------
# What a script can reach, and the bounds on what it can make the library do
# ---------------------------------------------------------------------------------------------


def test_module_namespace_is_the_public_functions_and_private_names_only() -> None:
    public = {name for name in vars(ta) if not name.startswith("_")}
    assert public == set(ta.__all__)
    assert type(ta.__all__) is tuple
    for name in ta.__all__:
        func = getattr(ta, name)
        assert type(func) is types.FunctionType and func.__module__ == "shared.domain.sandbox.ta"
        assert all(type(d) in (int, float) for d in func.__defaults__ or ())
        assert func.__closure__ is None
    mutable = (list, dict, set, bytearray, np.ndarray)
    state = [name for name, value in vars(ta).items() if isinstance(value, mutable) and name != "__builtins__"]
    assert state == []  # no module state a call could change


def test_series_inputs_are_read_in_one_copy_and_equal_tuple_inputs() -> None:
    series = series_of(CLOSE)
    assert same(ta.sma(series, 10), ta.sma(CLOSE, 10))
    assert same(ta.sma(series[5:], 10), ta.sma(CLOSE[5:], 10))  # a slice is a plain array('d'): read the same way
    assert same(ta.atr(series_of(HIGH), series_of(LOW), series), ta.atr(HIGH, LOW, CLOSE))
    assert ta.crossover(series, series_of(OTHER)) == ta.crossover(CLOSE, OTHER)
    with pytest.raises(TypeError, match="series, tuple or list"):
        ta.sma(array("i", [1, 2, 3]), 2)  # an int array is not a float series


def test_results_are_fresh_read_only_series() -> None:
    first, second = ta.sma(CLOSE, 5), ta.sma(CLOSE, 5)
    assert type(first) is Series and same(first, second) and first is not second
    with pytest.raises(TypeError):
        first[0] = 1.0
    with pytest.raises(TypeError):
        first.append(1.0)
    grown: Any = first
    grown += second  # a new array, as for a tuple: the result itself is unchanged
    assert len(first) == len(CLOSE) and len(grown) == 2 * len(CLOSE)
    assert all(type(v) is tuple and all(type(x) is bool for x in v) for v in [ta.crossover(CLOSE, OTHER)])


def test_calls_import_nothing_after_the_module_is_loaded() -> None:
    """The sandbox may close `open` (seccomp) after importing ta: no call may need a lazy import."""
    script = """
import math, sys
from shared.domain.sandbox import ta
from shared.domain.sandbox.series import Series, series_of
import tests.unit.test_indicators as t
before = set(sys.modules)
for length in (0, 1, 5, 60):
    values = tuple(float(i % 7) + 1.0 for i in range(length))
    for call in t.all_calls(values).values():
        call()
    for call in t.all_calls(tuple(math.nan if i % 5 == 0 else v for i, v in enumerate(values))).values():
        call()
for bad in ((1.0, "x"), "abc", (True,)):
    try:
        ta.sma(bad, 2)
    except TypeError:
        pass
try:
    ta._run("sma", lambda: __import__("numpy").empty(10**15))
except MemoryError:
    pass
print(sorted(set(sys.modules) - before))
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_the_core_never_writes_into_its_inputs() -> None:
    values = np.array(CLOSE)
    values[5] = np.nan
    values.flags.writeable = False
    other = np.array(OTHER)
    other.flags.writeable = False
    for func in (core.sma, core.ema, core.wma, core.wilder, core.rsi, core.stdev, core.zscore):
        func(values, 7)
    core.macd(values), core.bollinger(values), core.drawdown(values), core.pct_change(values)
    core.correlation(values, other, 9), core.atr(values, values, values), core.crossover(values, other)
    assert np.isnan(values[5]) and values[6] == CLOSE[6]


def peak_bytes(call: Callable[[], object]) -> int:
    tracemalloc.start()
    try:
        call()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_period_longer_than_the_series_allocates_nothing_period_sized() -> None:
    short = CLOSE[:50]
    for func in (ta.sma, ta.ema, ta.wma, ta.stdev, ta.rolling_max, ta.rsi, ta.zscore):
        assert peak_bytes(functools.partial(func, short, 1_000_000)) < 64 * 1024
    assert peak_bytes(lambda: ta.macd(short, 500_000, 1_000_000, 1_000_000)) < 64 * 1024


@pytest.mark.parametrize("name", sorted(ta.__all__))
def test_memory_is_a_small_multiple_of_the_input(name: str) -> None:
    """Documented bound: temporaries of at most 24 float64 arrays of length n (correlation; 12 for stdev,
    zscore and bollinger, 8 for the rest), plus the result itself (a tuple of n floats: 32 bytes a value,
    three such tuples for macd and bollinger)."""
    n = 200_000
    values = walk(n, 11)
    call = all_calls(values)[name]
    result_bytes = 3 * 32 * n if name in ("macd", "bollinger") else 32 * n
    arrays = {"correlation": 24, "stdev": 12, "zscore": 12, "bollinger": 12}.get(name, 8)
    assert peak_bytes(call) < result_bytes + arrays * 8 * n


@pytest.mark.parametrize("name", ["sma", "wma", "stdev", "rolling_max", "correlation", "ema", "zscore"])
def test_work_does_not_grow_with_the_period(name: str) -> None:
    """O(n) whatever the period: a sliding-window implementation would be ~10,000 times slower here."""
    values = np.asarray(walk(100_000, 12))
    func: Callable[[np.ndarray, int], object] = {
        "sma": core.sma,
        "wma": core.wma,
        "stdev": core.stdev,
        "rolling_max": core.rolling_max,
        "correlation": lambda v, p: core.correlation(v, v[::-1], p),
        "ema": core.ema,
        "zscore": core.zscore,
    }[name]

    def best(period: int) -> float:
        times = []
        for _ in range(3):
            start = time.perf_counter()
            func(values, period)
            times.append(time.perf_counter() - start)
        return min(times)

    assert best(50_000) < 5 * best(5) + 0.01


def test_sma_equals_a_plain_python_loop() -> None:
    """A plain Python loop gives the same values (the speed is measured in benchmarks/sandbox_overhead.py,
    not asserted in a test)."""
    close = walk(2520, 13)

    def loop_sma(values: tuple[float, ...], n: int) -> tuple[float, ...]:
        out = []
        for i in range(len(values)):
            if i < n - 1:
                out.append(NAN)
            else:
                total = 0.0
                for j in range(i - n + 1, i + 1):
                    total += values[j]
                out.append(total / n)
        return tuple(out)

    assert ta.sma(close, 20) == pytest.approx(loop_sma(close, 20), rel=1e-12, nan_ok=True)
