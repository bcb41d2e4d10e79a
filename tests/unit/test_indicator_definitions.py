"""One indicator library: the script-facing ``ta`` and the backtest engine give the same values on the same bars,
and the O(n) rolling standard deviation keeps full precision on long, badly scaled series."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from shared.domain.backtest import BacktestConfig, Bars
from shared.domain.backtest.strategies import REGISTRY, RsiReversionParams, bollinger_bands
from shared.domain.indicators import core, engine
from shared.domain.sandbox import ta
from tests.unit.backtest.conftest import make_bars


def _walk(n: int, seed: int) -> np.ndarray:
    return 100.0 * np.exp(np.cumsum(np.random.default_rng(seed).normal(0.0, 0.02, n)))


SERIES = {
    "walk": _walk(600, 4),
    "flat": np.full(60, 42.5),
    "rising": np.arange(1.0, 61.0),
    "falling": np.arange(60.0, 0.0, -1.0),
    "flat_then_walk": np.concatenate([np.full(40, 10.0), _walk(200, 5) / 10]),
}


@pytest.mark.parametrize("name", sorted(SERIES))
@pytest.mark.parametrize("period", [2, 5, 14, 30])
def test_ta_and_the_engine_give_the_same_rsi_stdev_and_channels(name: str, period: int) -> None:
    x = SERIES[name]
    values = tuple(x.tolist())
    same = np.testing.assert_array_equal
    same(np.array(ta.rsi(values, period)), engine.rsi(x, period))
    same(np.array(ta.stdev(values, period, 0)), engine.rolling_std(x, period, 0))
    same(np.array(ta.stdev(values, period, 1)), engine.rolling_std(x, period, 1))
    same(np.array(ta.rolling_max(values, period)), engine.rolling_max(x, period))
    same(np.array(ta.rolling_min(values, period)), engine.rolling_min(x, period))
    lower, mid, upper = bollinger_bands(x, period, 2.0)
    ta_upper, ta_mid, ta_lower = (np.array(band) for band in ta.bollinger(values, period, 2.0))
    np.testing.assert_allclose(ta_mid, mid, rtol=1e-13, atol=0.0)
    np.testing.assert_allclose(ta_upper, upper, rtol=1e-13, atol=0.0)
    np.testing.assert_allclose(ta_lower, lower, rtol=1e-13, atol=0.0)
    # The SMA: the engine's pandas-exact kernel and ta's vectorised form, within 1e-13 relative;
    # a window of equal values is that value exactly in both.
    got, kernel = np.array(ta.sma(values, period)), engine.sma(x, period)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(kernel))
    np.testing.assert_allclose(got, kernel, rtol=1e-13, atol=0.0)
    flat = engine.rolling_max(x, period) == engine.rolling_min(x, period)  # windows of equal values
    same(got[flat], kernel[flat])


def test_flat_rsi_is_50_in_ta_and_in_the_engine() -> None:
    flat = np.full(30, 7.0)
    assert tuple(ta.rsi(tuple(flat.tolist()), 14)[14:]) == (50.0,) * 16
    assert engine.rsi(flat, 14)[14:].tolist() == [50.0] * 16
    assert all(v == 100.0 for v in ta.rsi(tuple(SERIES["rising"].tolist()), 14)[14:])
    assert all(v == 0.0 for v in ta.rsi(tuple(SERIES["falling"].tolist()), 14)[14:])


def test_a_screen_and_a_backtest_of_the_same_rsi_rule_see_the_same_values() -> None:
    """The backtest's recorded RSI column is what ``ta.rsi`` gives a script on the same bars (a flat start
    included, where the old ``ta`` said NaN and the engine 50)."""
    close = _walk(300, 7)
    close[:40] = close[0]  # a listing that did not trade at first
    bars: Bars = make_bars(close)
    config = BacktestConfig.model_validate({"symbols": ["X"], "strategy": {"name": "rsi_reversion"}})
    params = config.strategy.params
    assert isinstance(params, RsiReversionParams)
    signals = REGISTRY["rsi_reversion"].compute(bars, params, 0, 0)
    screened = ta.rsi(tuple(bars.close.tolist()), params.period)
    np.testing.assert_array_equal(signals.indicators["rsi"], np.array(screened))
    assert signals.indicators["rsi"][14:40].tolist() == [50.0] * 26
    assert not np.isnan(screened[14:]).any()


def _exact_std(window: np.ndarray, ddof: int) -> float:
    """The window's standard deviation to ~1 ulp: deviations from one of its values are exact (Sterbenz),
    their sums exactly rounded (math.fsum)."""
    d = (window - window[0]).tolist()
    n = len(d)
    total = math.fsum(d)
    m2 = math.fsum(v * v for v in d) - total * total / n
    return math.sqrt(max(m2, 0.0) / (n - ddof))


@pytest.mark.parametrize("level", [1e8, 3e12])
def test_rolling_std_keeps_full_precision_on_long_badly_scaled_series(level: float) -> None:
    """A million bars at a huge level moving by ~1e-3 of a unit: the O(n) block-anchored rolling std agrees with
    pandas' rolling std of the same data (pandas is given it shifted to zero, which is exact by Sterbenz and where
    its running sums are accurate; on the unshifted data pandas itself is off by percent) and with an exact
    reference."""
    rng = np.random.default_rng(11)
    n = 1_000_000
    scale = 1e-3 * level / 1e8
    x = level + np.cumsum(rng.normal(0.0, scale, n)) * 0.01 + rng.normal(0.0, scale, n)
    shifted = pd.Series(x - level)
    for window in (20, 250, 5000):
        positions = rng.integers(window - 1, n, 40)
        for ddof in (0, 1):
            got = engine.rolling_std(x, window, ddof)
            assert np.isnan(got[: window - 1]).all() and not np.isnan(got[window - 1 :]).any()
            np.testing.assert_allclose(got, shifted.rolling(window).std(ddof=ddof).to_numpy(), rtol=1e-9, atol=0.0)
            exact = [_exact_std(x[i - window + 1 : i + 1], ddof) for i in positions]
            np.testing.assert_allclose(got[positions], exact, rtol=1e-12, atol=0.0)


def test_realized_volatility_is_the_annualised_sample_stdev_of_log_returns() -> None:
    x = SERIES["walk"]
    expected = core.stdev(core.log_returns(x), 20, 1) * math.sqrt(252)
    np.testing.assert_array_equal(engine.realized_volatility(x, 20, 252.0), expected)
    assert np.isnan(expected[:20]).all() and not np.isnan(expected[20:]).any()
