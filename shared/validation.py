"""Statistical validation of a backtest: pure functions on one symbol's bars and config (no queue, no database).

Randomness is split into *tasks*: each method's ``n`` draws are cut into chunks of ``chunk`` draws, and task ``k``
draws from ``default_rng(SeedSequence([seed, method, k]))``. A task's numbers therefore depend only on the run's
seed, the method and the task index, never on which worker ran it or how many workers there were: running the
tasks in one process, in two, or on a Celery cluster gives the same numbers bit for bit.

Methods:

* ``permutation``: the bar-to-bar returns (open, high, low and close together, so each bar keeps its shape) are
  shuffled, prices rebuilt from the first bar, and the strategy re-run; the p-value is
  ``(1 + #{permuted Sharpe >= observed}) / (1 + n)`` (Phipson & Smyth: never 0).
* ``bootstrap``: circular block bootstrap of the strategy's daily equity returns (blocks of ``block`` days keep
  short-range dependence); percentile intervals of Sharpe, total return and maximum drawdown.
* ``monte_carlo``: each draw re-runs the backtest with fees and slippage shocked upward by the absolute value of a
  normal draw (``fee_bps_sigma``, ``slippage_bps_sigma``); the distribution of final equity.
* ``walk_forward`` (dual SMA): rolling or anchored windows; on each in-sample window the (fast, slow) pair with
  the best Sharpe is chosen from the grid, then run on the following out-of-sample window. Deterministic.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field, model_validator

from shared.backtest import BacktestConfig, Bars, run_backtest
from shared.backtest.grid import run_dual_sma_grid

METHOD_CODES = {"permutation": 1, "bootstrap": 2, "monte_carlo": 3}
TRADING_DAYS = 252


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PermutationSpec(_Spec):
    n: int = Field(default=200, ge=10, le=10_000, description="number of permutations")


class BootstrapSpec(_Spec):
    n: int = Field(default=1000, ge=10, le=100_000, description="number of bootstrap samples")
    block: int = Field(default=20, ge=1, le=1000, description="block length in bars")
    confidence: float = Field(default=0.95, gt=0.5, lt=1)


class MonteCarloSpec(_Spec):
    n: int = Field(default=200, ge=10, le=10_000, description="number of cost scenarios")
    fee_bps_sigma: float = Field(default=5.0, ge=0, le=500)
    slippage_bps_sigma: float = Field(default=5.0, ge=0, le=500)


class WalkForwardSpec(_Spec):
    in_sample: int = Field(default=504, ge=50, le=20_000, description="bars of each in-sample window")
    out_of_sample: int = Field(default=126, ge=10, le=20_000, description="bars of each out-of-sample window")
    anchored: bool = Field(default=False, description="in-sample windows all start at the first bar")
    fast: list[int] = Field(default=[5, 10, 20], min_length=1, max_length=200)
    slow: list[int] = Field(default=[50, 100, 200], min_length=1, max_length=200)

    @model_validator(mode="after")
    def _pairs(self) -> WalkForwardSpec:
        if not any(f < s for f in self.fast for s in self.slow):
            raise ValueError("the grid has no pair with fast < slow")
        return self


class ValidationSpec(_Spec):
    """Which validations a run performs (all off by default) and how the work is split into tasks."""

    permutation: PermutationSpec | None = None
    bootstrap: BootstrapSpec | None = None
    monte_carlo: MonteCarloSpec | None = None
    walk_forward: WalkForwardSpec | None = None
    chunk: int = Field(default=50, ge=1, le=10_000, description="draws per task")


def task_rng(seed: int, method: str, task_index: int) -> np.random.Generator:
    """The random stream of one task: a function of (run seed, method, task index) only."""
    return np.random.default_rng(np.random.SeedSequence([seed, METHOD_CODES[method], task_index]))


def task_plan(n: int, chunk: int) -> list[tuple[int, int]]:
    """(task index, draws) of each task: ``n`` draws in chunks of ``chunk``."""
    return [(k, min(chunk, n - start)) for k, start in enumerate(range(0, n, chunk))]


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
    )


def _sharpe(metrics: dict[str, Any]) -> float:
    value = metrics.get("Sharpe Ratio")
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else -math.inf


def permutation_task(bars: Bars, config: BacktestConfig, seed: int, task_index: int, draws: int) -> list[float]:
    rng = task_rng(seed, "permutation", task_index)
    cut = bars.between(config.start_date, config.end_date)
    return [_sharpe(run_backtest(permuted_bars(cut, rng), config).metrics) for _ in range(draws)]


def permutation_result(observed: float, sharpes: Sequence[float], spec: PermutationSpec, seed: int) -> dict[str, Any]:
    values = np.asarray(sharpes, dtype=np.float64)
    at_least = int(np.sum(values >= observed))
    finite = values[np.isfinite(values)]
    return {
        "method": "permutation test of the Sharpe ratio against shuffled bar returns",
        "params": spec.model_dump(),
        "seed": seed,
        "observed_sharpe": observed,
        "p_value": (1 + at_least) / (1 + len(values)),
        "permuted_sharpe_mean": float(finite.mean()) if len(finite) else None,
        "permuted_sharpe_p95": float(np.quantile(finite, 0.95)) if len(finite) else None,
    }


# --- block bootstrap -----------------------------------------------------------------------------------------


def daily_returns(equity: NDArray[np.float64]) -> NDArray[np.float64]:
    return np.asarray(equity[1:] / equity[:-1] - 1, dtype=np.float64)


def _path_stats(returns: NDArray[np.float64]) -> tuple[float, float, float]:
    """(annualised Sharpe, total return %, max drawdown %) of one return path."""
    std = float(np.std(returns, ddof=1)) if len(returns) > 1 else 0.0
    sharpe = float(np.mean(returns)) / std * math.sqrt(TRADING_DAYS) if std > 0 else 0.0
    path = np.cumprod(1 + returns)
    drawdown = float(np.min(path / np.maximum.accumulate(np.concatenate([[1.0], path]))[1:] - 1))
    return sharpe, (float(path[-1]) - 1) * 100, min(drawdown, 0.0) * 100


def bootstrap_task(
    returns: NDArray[np.float64], block: int, seed: int, task_index: int, draws: int
) -> list[tuple[float, float, float]]:
    rng = task_rng(seed, "bootstrap", task_index)
    n = len(returns)
    blocks = -(-n // block)
    out = []
    for _ in range(draws):
        starts = rng.integers(0, n, size=blocks)
        idx = (starts[:, None] + np.arange(block)[None, :]).ravel()[:n] % n
        out.append(_path_stats(returns[idx]))
    return out


def bootstrap_result(
    returns: NDArray[np.float64], samples: Sequence[tuple[float, float, float]], spec: BootstrapSpec, seed: int
) -> dict[str, Any]:
    values = np.asarray(samples, dtype=np.float64)
    alpha = (1 - spec.confidence) / 2
    observed = _path_stats(returns)
    names = ("sharpe", "return_pct", "max_drawdown_pct")
    return {
        "method": "circular block bootstrap of daily equity returns, percentile intervals",
        "params": spec.model_dump(),
        "seed": seed,
        "intervals": {
            name: {
                "observed": observed[i],
                "low": float(np.quantile(values[:, i], alpha)),
                "high": float(np.quantile(values[:, i], 1 - alpha)),
            }
            for i, name in enumerate(names)
        },
    }


# --- Monte Carlo of costs ------------------------------------------------------------------------------------


def cost_shock_task(
    bars: Bars, config: BacktestConfig, spec: MonteCarloSpec, seed: int, task_index: int, draws: int
) -> list[float]:
    rng = task_rng(seed, "monte_carlo", task_index)
    ex = config.execution
    finals = []
    for _ in range(draws):
        fee, slip = np.abs(rng.normal(0.0, 1.0, size=2)) * (spec.fee_bps_sigma, spec.slippage_bps_sigma)
        shocked = config.model_copy(
            update={
                "execution": ex.model_copy(
                    update={
                        "fee_bps": min(ex.fee_bps + float(fee), 999.0),
                        "slippage_bps": min(ex.slippage_bps + float(slip), 999.0),
                    }
                )
            }
        )
        finals.append(float(run_backtest(bars, shocked).metrics["Equity Final [$]"]))
    return finals


def cost_shock_result(baseline: float, finals: Sequence[float], spec: MonteCarloSpec, seed: int) -> dict[str, Any]:
    values = np.asarray(finals, dtype=np.float64)
    return {
        "method": "Monte Carlo of fee and slippage shocks (|normal| added to the configured costs)",
        "params": spec.model_dump(),
        "seed": seed,
        "baseline_final_equity": baseline,
        "final_equity": {q: float(np.quantile(values, float(q))) for q in ("0.05", "0.25", "0.5", "0.75", "0.95")},
        "mean_final_equity": float(values.mean()),
    }


# --- walk-forward --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    in_start: int
    in_end: int  # exclusive
    out_end: int  # exclusive; the out-of-sample window is [in_end, out_end)


def windows(n: int, spec: WalkForwardSpec) -> list[Window]:
    out = []
    in_end = spec.in_sample
    while in_end < n:
        in_start = 0 if spec.anchored else in_end - spec.in_sample
        out.append(Window(in_start, in_end, min(in_end + spec.out_of_sample, n)))
        in_end += spec.out_of_sample
    return out


def _slice(bars: Bars, lo: int, hi: int) -> Bars:
    return Bars(
        open=bars.open[lo:hi], high=bars.high[lo:hi], low=bars.low[lo:hi], close=bars.close[lo:hi],
        volume=bars.volume[lo:hi], dates=bars.dates[lo:hi],
    )  # fmt: skip


def walk_forward(bars: Bars, config: BacktestConfig, spec: WalkForwardSpec) -> dict[str, Any]:
    """Re-choose (fast, slow) on each in-sample window by Sharpe, then trade it out of sample. The out-of-sample
    run starts ``slow`` bars early so its averages are warm on the window's first bar (those bars come from the
    in-sample past: no look-ahead)."""
    if config.strategy.name != "dual_sma":
        raise ValueError("walk-forward re-optimises the dual_sma strategy's windows")
    cut = bars.between(config.start_date, config.end_date)
    pairs = [(f, s) for f in spec.fast for s in spec.slow if f < s]
    fast = np.array([p[0] for p in pairs], dtype=np.int64)
    slow = np.array([p[1] for p in pairs], dtype=np.int64)
    rows: list[dict[str, Any]] = []
    for w in windows(len(cut), spec):
        grid = run_dual_sma_grid(_slice(cut, w.in_start, w.in_end), fast, slow, config)
        sharpe = np.nan_to_num(grid.column("Sharpe Ratio"), nan=-np.inf)
        best = int(np.argmax(sharpe))
        chosen = {"fast": int(fast[best]), "slow": int(slow[best])}
        warm = max(0, w.in_end - chosen["slow"])
        params = config.strategy.params.model_copy(update=chosen)
        oos_config = config.model_copy(update={"strategy": config.strategy.model_copy(update={"params": params}),
                                               "start_date": None, "end_date": None})  # fmt: skip
        equity = run_backtest(_slice(cut, warm, w.out_end), oos_config).equity[w.in_end - warm :]
        rows.append({
            "in_sample": [str(cut.dates[w.in_start]), str(cut.dates[w.in_end - 1])],
            "out_of_sample": [str(cut.dates[w.in_end]), str(cut.dates[w.out_end - 1])],
            "chosen": chosen,
            "in_sample_sharpe": float(sharpe[best]) if math.isfinite(sharpe[best]) else None,
            "out_of_sample_return_pct": (float(equity[-1]) / float(equity[0]) - 1) * 100 if len(equity) else None,
        })  # fmt: skip
    oos: list[float] = [r["out_of_sample_return_pct"] for r in rows if r["out_of_sample_return_pct"] is not None]
    compounded = (math.prod(1 + r / 100 for r in oos) - 1) * 100 if oos else None
    return {
        "method": ("anchored" if spec.anchored else "rolling") + " walk-forward, parameters chosen by in-sample Sharpe",
        "params": spec.model_dump(),
        "windows": rows,
        "out_of_sample_return_pct": compounded,
    }


Method = Literal["permutation", "bootstrap", "monte_carlo"]
