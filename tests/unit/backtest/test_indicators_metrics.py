"""Indicator kernels against pandas, metrics pieces by hand, the grid against single runs, JSON output."""

from __future__ import annotations

import json
import math
import statistics

import numpy as np
import pandas as pd
import pytest

from shared.domain.backtest import BacktestConfig, Bars, run_backtest
from shared.domain.backtest.grid import SUMMARY_NAMES, all_pairs, run_dual_sma_grid
from shared.domain.backtest.metrics import geometric_mean, periods_per_year, probabilistic_sharpe_ratio
from shared.domain.indicators import engine as ind
from tests.unit.backtest.conftest import make_bars


def test_sma_is_bit_identical_to_pandas_rolling_mean(goog_bars: Bars) -> None:
    for n in range(2, 101):
        expected = pd.Series(goog_bars.close).rolling(n).mean().to_numpy()
        np.testing.assert_array_equal(ind.sma(goog_bars.close, n), expected)
    rng = np.random.default_rng(3)
    values = np.round(rng.uniform(-20, 80, 5000), 2)
    values[100:140] = 7.25  # a run of equal values (pandas returns the value itself)
    values[rng.integers(0, 5000, 30)] = np.nan
    for n in (2, 3, 17, 64):
        np.testing.assert_array_equal(ind.sma(values, n), pd.Series(values).rolling(n).mean().to_numpy())


def test_rolling_std_max_min_against_pandas(goog_bars: Bars) -> None:
    close = goog_bars.close
    for n in (2, 20, 55):
        s = pd.Series(close).rolling(n)
        np.testing.assert_allclose(ind.rolling_std(close, n, 0), s.std(ddof=0).to_numpy(), rtol=1e-9)
        np.testing.assert_allclose(ind.rolling_std(close, n, 1), s.std(ddof=1).to_numpy(), rtol=1e-9)
        np.testing.assert_array_equal(ind.rolling_max(close, n), s.max().to_numpy())
        np.testing.assert_array_equal(ind.rolling_min(close, n), s.min().to_numpy())


def test_rsi_by_hand_and_against_wilder_smoothing(goog_bars: Bars) -> None:
    close = np.array([10, 11, 10.5, 11.5, 12, 11], dtype=float)
    out = ind.rsi(close, 3)
    assert np.isnan(out[:3]).all()
    gain, loss = (1 + 1) / 3, 0.5 / 3  # changes +1, -0.5, +1
    assert out[3] == pytest.approx(100 - 100 / (1 + gain / loss))
    gain, loss = (gain * 2 + 0.5) / 3, (loss * 2) / 3  # +0.5
    assert out[4] == pytest.approx(100 - 100 / (1 + gain / loss))
    # against pandas' Wilder (ewm alpha=1/n, adjust=False) seeded with the plain mean of the first n changes
    n = 14
    diff = np.diff(goog_bars.close)
    up = pd.Series(np.r_[np.clip(diff, 0, None)[:n].mean(), np.clip(diff, 0, None)[n:]])
    down = pd.Series(np.r_[np.clip(-diff, 0, None)[:n].mean(), np.clip(-diff, 0, None)[n:]])
    rs = up.ewm(alpha=1 / n, adjust=False).mean() / down.ewm(alpha=1 / n, adjust=False).mean()
    np.testing.assert_allclose(ind.rsi(goog_bars.close, n)[n:], (100 - 100 / (1 + rs)).to_numpy(), rtol=1e-9)


def test_realized_volatility_against_pandas(goog_bars: Bars) -> None:
    log_returns = pd.Series(np.log(goog_bars.close)).diff()
    expected = (log_returns.rolling(20).std() * math.sqrt(252)).to_numpy()
    np.testing.assert_allclose(ind.realized_volatility(goog_bars.close, 20, 252.0), expected, rtol=1e-9)


def test_geometric_mean_conventions() -> None:
    assert geometric_mean(np.array([0.1, -0.1])) == pytest.approx(math.sqrt(1.1 * 0.9) - 1)
    assert geometric_mean(np.array([0.5, -1.0])) == 0.0  # a total loss: backtesting.py reports 0
    assert math.isnan(geometric_mean(np.array([])))


def test_periods_per_year_detection() -> None:
    weekdays = np.busday_offset("2024-01-01", np.arange(300), roll="forward").astype("datetime64[D]")
    assert periods_per_year(weekdays) == (252, 1)
    every_day = np.datetime64("2024-01-01") + np.arange(300)
    assert periods_per_year(every_day) == (365, 1)
    weekly = np.datetime64("2024-01-01") + 7 * np.arange(300)
    assert periods_per_year(weekly)[0] == 52


def _psr_reference(returns: list[float], benchmark: float) -> float:
    """LEAN's formula written out with the statistics module (an independent code path)."""
    n = len(returns)
    mean = statistics.fmean(returns)
    sd = statistics.stdev(returns)
    sharpe = mean / sd
    skew = n / ((n - 1) * (n - 2)) * sum(((x - mean) / sd) ** 3 for x in returns)
    kurt = (n * (n + 1) / ((n - 1) * (n - 2) * (n - 3))) * sum(((x - mean) / sd) ** 4 for x in returns) - (
        3 * (n - 1) ** 2 / ((n - 2) * (n - 3))
    )
    se = math.sqrt((1 - skew * sharpe + (kurt - 1) / 4 * sharpe**2) / (n - 1))
    return 0.5 * (1 + math.erf((sharpe - benchmark) / se / math.sqrt(2)))


def test_probabilistic_sharpe_ratio() -> None:
    rng = np.random.default_rng(5)
    returns = rng.normal(0.001, 0.01, 500)
    bench = 1 / math.sqrt(252)
    assert probabilistic_sharpe_ratio(returns, bench) == pytest.approx(_psr_reference(list(returns), bench), rel=1e-12)
    strong = rng.normal(0.01, 0.01, 2000)
    assert probabilistic_sharpe_ratio(strong, bench) > 0.999
    assert probabilistic_sharpe_ratio(-strong, bench) < 0.001
    assert probabilistic_sharpe_ratio(np.zeros(10), bench) == 0.0  # LEAN: undefined -> 0


def test_risk_free_rate_lowers_sharpe_and_psr(goog_bars: Bars) -> None:
    def metrics(rate: float) -> dict:
        return run_backtest(
            goog_bars,
            BacktestConfig.model_validate(
                {"symbols": ["GOOG"], "strategy": {"name": "dual_sma"}, "risk_free_rate": rate}
            ),
        ).metrics

    zero, five = metrics(0.0), metrics(0.05)
    assert five["Sharpe Ratio"] < zero["Sharpe Ratio"]
    assert five["Sortino Ratio"] < zero["Sortino Ratio"]
    assert five["Probabilistic Sharpe Ratio"] < zero["Probabilistic Sharpe Ratio"]
    assert five["Return [%]"] == zero["Return [%]"]
    assert five["Sharpe Ratio"] == pytest.approx(
        (zero["Return (Ann.) [%]"] - 5) / zero["Volatility (Ann.) [%]"], rel=1e-12
    )


@pytest.mark.parametrize("convention", ["backtesting_py", "native"])
def test_grid_cells_equal_single_runs(goog_bars: Bars, convention: str) -> None:
    execution = {"convention": convention, "fee_bps": 20, "allow_short": True}
    if convention == "native":
        execution |= {"slippage_bps": 3, "fixed_fee": 1.0, "flatten_at_end": True}
    config = BacktestConfig.model_validate(
        {"symbols": ["GOOG"], "strategy": {"name": "dual_sma"}, "execution": execution}
    )
    fast, slow = all_pairs(2, 40)
    grid = run_dual_sma_grid(goog_bars, fast, slow, config)
    rng = np.random.default_rng(0)
    for k in rng.choice(len(fast), 12, replace=False):
        single = run_backtest(
            goog_bars,
            config.model_copy(
                update={
                    "strategy": BacktestConfig.model_validate(
                        {
                            "symbols": ["X"],
                            "strategy": {"name": "dual_sma", "params": {"fast": int(fast[k]), "slow": int(slow[k])}},
                        }
                    ).strategy
                }
            ),
        )
        for j, name in enumerate(SUMMARY_NAMES):
            assert grid.summary[k, j] == pytest.approx(single.metrics[name], rel=1e-9, nan_ok=True), (k, name)


def test_grid_rejects_bad_pairs(goog_bars: Bars) -> None:
    config = BacktestConfig.model_validate({"symbols": ["GOOG"], "strategy": {"name": "dual_sma"}})
    with pytest.raises(ValueError, match="fast < slow"):
        run_dual_sma_grid(goog_bars, np.array([5, 9]), np.array([10, 9]), config)


def test_result_is_json_ready(goog_bars: Bars) -> None:
    config = BacktestConfig.model_validate({"symbols": ["GOOG"], "strategy": {"name": "rsi_reversion"}})
    result = run_backtest(goog_bars, config)
    text = json.dumps(result.to_dict(), allow_nan=False)
    doc = json.loads(text)
    assert doc["config_hash"] == config.config_hash
    assert len(doc["equity_curve"]["equity"]) == len(goog_bars)
    assert len(doc["trades"]) == doc["metrics"]["# Trades"]
    for key in (
        "Probabilistic Sharpe Ratio",
        "Turnover [x]",
        "Turnover (Ann.) [x]",
        "Risk-Free Rate [%]",
        "Kelly Criterion",
        "SQN",
        "Calmar Ratio",
        "Alpha [%]",
        "Beta",
        "CAGR [%]",
    ):
        assert key in doc["metrics"]


def test_date_range_cuts_the_bars(goog_bars: Bars) -> None:
    config = BacktestConfig.model_validate(
        {
            "symbols": ["GOOG"],
            "strategy": {"name": "buy_and_hold"},
            "start_date": "2010-01-01",
            "end_date": "2010-12-31",
        }
    )
    result = run_backtest(goog_bars, config)
    assert result.metrics["Start"] == "2010-01-04" and result.metrics["End"] == "2010-12-31"


def test_bars_validation_names_the_array_and_bar() -> None:
    from shared.domain.backtest import BarsError

    good = make_bars(close=[1, 2, 3])
    with pytest.raises(BarsError, match=r"close\[1\]"):
        Bars.from_arrays(
            open=good.open, high=good.high, low=good.low, close=[1, np.nan, 3], volume=good.volume, dates=good.dates
        )
    with pytest.raises(BarsError, match=r"dates\[2\]"):
        Bars.from_arrays(
            open=good.open,
            high=good.high,
            low=good.low,
            close=good.close,
            volume=good.volume,
            dates=["2024-01-01", "2024-01-03", "2024-01-02"],
        )
    with pytest.raises(BarsError, match="volume"):
        Bars.from_arrays(
            open=good.open, high=good.high, low=good.low, close=good.close, volume=[1, 2], dates=good.dates
        )
