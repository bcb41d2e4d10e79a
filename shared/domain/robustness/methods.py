"""The resampling methods: permutation test, circular block bootstrap, Monte Carlo of costs."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from shared.domain.backtest import BacktestConfig, Bars, run_backtest
from shared.domain.robustness.portfolio import (
    SCRIPT_BATCH_BACKTESTS,
    Sleeves,
    _clean,
    portfolio_curve,
    portfolio_sharpe,
)
from shared.domain.robustness.specs import BootstrapSpec, MonteCarloSpec, PermutationSpec, sleeve_rng, task_rng
from shared.domain.stats import sharpe_ratio

# --- permutation ---------------------------------------------------------------------------------------------


def permuted_bars(bars: Bars, rng: np.random.Generator) -> Bars:
    """The same bars with their bar-to-bar log returns shuffled jointly (each bar's open/high/low keep their
    ratio to its close, its volume moves with it); the first bar stays where it is."""
    close = bars.close
    log_close = np.log(close)
    steps = np.diff(log_close)
    order = rng.permutation(len(steps))
    new_close = np.exp(np.concatenate([[log_close[0]], log_close[0] + np.cumsum(steps[order])]))
    idx = np.concatenate([[0], order + 1])
    return Bars.from_arrays(
        open=new_close * bars.open[idx] / close[idx],
        high=new_close * bars.high[idx] / close[idx],
        low=new_close * bars.low[idx] / close[idx],
        close=new_close,
        volume=bars.volume[idx],
        dates=bars.dates,
        timeframe=bars.timeframe,
    )


def _finite_or_floor(value: float) -> float:
    return value if math.isfinite(value) else -math.inf


def permutation_draws(s: Sleeves, seed: int, task_index: int, draws: int) -> Iterator[float]:
    """The portfolio Sharpe of ``draws`` permutations (NaN as -inf: it never beats the observed)."""
    rngs = [sleeve_rng(seed, "permutation", task_index, p) for p in s.positions]
    if s.backtester is not None:
        yield from _script_permutation_draws(s, rngs, draws)
        return
    for _ in range(draws):
        curves = []
        for bars, rng in zip(s.bars, rngs, strict=True):
            result = run_backtest(permuted_bars(bars, rng), s.config)
            curves.append((result.dates, result.equity))
        total = portfolio_curve(curves, s.config.initial_cash)[1]
        yield _finite_or_floor(portfolio_sharpe(total, s.start_equity, s.config.risk_free_rate))


def _script_permutation_draws(s: Sleeves, rngs: list[np.random.Generator], draws: int) -> Iterator[float]:
    """Permutation draws of a script strategy: the permuted bars go through the sandbox, a batch of draws per
    sandbox process. Each symbol's stream is consumed in draw order, as one draw at a time would (same numbers).
    A script that fails on permuted bars fails the task with the reason."""
    assert s.backtester is not None
    per_batch = max(1, SCRIPT_BATCH_BACKTESTS // max(len(s), 1))
    done = 0
    while done < draws:
        k = min(per_batch, draws - done)
        batch = [permuted_bars(bars, rng) for _ in range(k) for bars, rng in zip(s.bars, rngs, strict=True)]
        results = s.backtester(list(s.symbols) * k, batch, s.config)
        for j in range(k):
            curves = []
            for i, symbol in enumerate(s.symbols):
                result = results[j * len(s) + i]
                if result is None:
                    raise RuntimeError(f"the strategy script failed on permuted bars of {symbol}")
                curves.append((result.dates, result.equity))
            total = portfolio_curve(curves, s.config.initial_cash)[1]
            yield _finite_or_floor(portfolio_sharpe(total, s.start_equity, s.config.risk_free_rate))
        done += k


def permutation_result(observed: float, sharpes: Sequence[float], spec: PermutationSpec, seed: int) -> dict[str, Any]:
    values = np.asarray(sharpes, dtype=np.float64)
    at_least = int(np.sum(values >= _finite_or_floor(observed)))
    finite = values[np.isfinite(values)]
    return {
        "method": "permutation test of the portfolio Sharpe ratio against each symbol's shuffled bar returns",
        "params": spec.model_dump(),
        "seed": seed,
        "observed_sharpe": observed if math.isfinite(observed) else None,
        "p_value": (1 + at_least) / (1 + len(values)),
        "permuted_sharpe_mean": float(finite.mean()) if len(finite) else None,
        "permuted_sharpe_p95": float(np.quantile(finite, 0.95)) if len(finite) else None,
    }


# --- block bootstrap -----------------------------------------------------------------------------------------


def daily_returns(equity: NDArray[np.float64]) -> NDArray[np.float64]:
    return np.asarray(equity[1:] / equity[:-1] - 1, dtype=np.float64)


def _path_stats(returns: NDArray[np.float64]) -> tuple[float, float, float]:
    """(annualised Sharpe, total return %, max drawdown %) of one return path."""
    sharpe = sharpe_ratio(returns)
    if math.isnan(sharpe):  # no variance (or a single return): 0, so that every draw is a number
        sharpe = 0.0
    path = np.cumprod(1 + returns)
    drawdown = float(np.min(path / np.maximum.accumulate(np.concatenate([[1.0], path]))[1:] - 1))
    return sharpe, (float(path[-1]) - 1) * 100, min(drawdown, 0.0) * 100


def bootstrap_task(
    returns: NDArray[np.float64], block: int, seed: int, task_index: int, draws: int
) -> list[tuple[float, float, float]]:
    return list(bootstrap_draws(returns, block, seed, task_index, draws))


def bootstrap_draws(
    returns: NDArray[np.float64], block: int, seed: int, task_index: int, draws: int
) -> Iterator[tuple[float, float, float]]:
    rng = task_rng(seed, "bootstrap", task_index)
    n = len(returns)
    blocks = -(-n // block)
    for _ in range(draws):
        starts = rng.integers(0, n, size=blocks)
        idx = (starts[:, None] + np.arange(block)[None, :]).ravel()[:n] % n
        yield _path_stats(returns[idx])


def bootstrap_result(
    observed: Sequence[float | None], samples: Sequence[Sequence[float]], spec: BootstrapSpec, seed: int
) -> dict[str, Any]:
    values = np.asarray(samples, dtype=np.float64).reshape(-1, 3)
    alpha = (1 - spec.confidence) / 2
    names = ("sharpe", "return_pct", "max_drawdown_pct")
    return {
        "method": "circular block bootstrap of the portfolio's daily returns, percentile intervals",
        "params": spec.model_dump(),
        "seed": seed,
        "intervals": {
            name: {
                "observed": observed[i],
                "low": _clean(float(np.quantile(values[:, i], alpha))),
                "high": _clean(float(np.quantile(values[:, i], 1 - alpha))),
            }
            for i, name in enumerate(names)
        },
    }


# --- Monte Carlo of costs ------------------------------------------------------------------------------------


def shocked_config(config: BacktestConfig, fee: float, slip: float) -> BacktestConfig:
    ex = config.execution
    update = {"fee_bps": min(ex.fee_bps + fee, 999.0), "slippage_bps": min(ex.slippage_bps + slip, 999.0)}
    return config.model_copy(update={"execution": ex.model_copy(update=update)})


def cost_shock_draws(s: Sleeves, spec: MonteCarloSpec, seed: int, task_index: int, draws: int) -> Iterator[float]:
    """The portfolio's final equity under ``draws`` cost shocks (one shock per draw, for every symbol)."""
    rng = task_rng(seed, "monte_carlo", task_index)
    for _ in range(draws):
        fee, slip = np.abs(rng.normal(0.0, 1.0, size=2)) * (spec.fee_bps_sigma, spec.slippage_bps_sigma)
        shocked = shocked_config(s.config, float(fee), float(slip))
        total = 0.0  # summed in symbol order, as portfolio_curve sums its last row
        if s.backtester is not None:  # the baseline's kept signals under the shocked costs: no sandbox run
            for symbol, result in zip(s.symbols, s.backtester(s.symbols, s.bars, shocked), strict=True):
                if result is None:
                    raise RuntimeError(f"the strategy script's signals for {symbol} do not run under shocked costs")
                total += float(result.equity[-1])
            yield total
            continue
        for bars in s.bars:
            total += float(run_backtest(bars, shocked).equity[-1])
        yield total


def cost_shock_result(baseline: float, finals: Sequence[float], spec: MonteCarloSpec, seed: int) -> dict[str, Any]:
    values = np.asarray(finals, dtype=np.float64)
    return {
        "method": "Monte Carlo of fee and slippage shocks (|normal| added to the configured costs), "
        "final portfolio equity",
        "params": spec.model_dump(),
        "seed": seed,
        "baseline_final_equity": baseline,
        "final_equity": {q: float(np.quantile(values, float(q))) for q in ("0.05", "0.25", "0.5", "0.75", "0.95")},
        "mean_final_equity": float(values.mean()),
    }
