"""A validation task's draws, the part it stores, and the run's result combined from the parts."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from shared.domain.backtest import BacktestConfig, Bars
from shared.domain.robustness.methods import (
    _path_stats,
    bootstrap_draws,
    bootstrap_result,
    cost_shock_draws,
    cost_shock_result,
    permutation_draws,
    permutation_result,
)
from shared.domain.robustness.portfolio import Backtester, Sleeves, _clean, portfolio_returns, portfolio_sharpe, sleeves
from shared.domain.robustness.specs import Method, Task, ValidationSpec, plan
from shared.domain.robustness.walk_forward import walk_forward_draws, walk_forward_result


def baseline(s: Sleeves, method: Method) -> dict[str, Any]:
    """What a method's result compares its draws with (each task computes it; all tasks agree)."""
    if not len(s):
        return {}
    total = s.total()
    if method == "permutation":
        return _clean({"sharpe": portfolio_sharpe(total, s.start_equity, s.config.risk_free_rate)})
    if method == "bootstrap":
        return _clean({"stats": list(_path_stats(portfolio_returns(total, s.start_equity)))})
    if method == "monte_carlo":
        return {"final_equity": float(total[-1])}
    return {}


def task_draws(s: Sleeves, spec: ValidationSpec, seed: int, task: Task) -> Iterator[Any]:
    """One task's draws, one at a time (a caller may stop between two: its cancellation checkpoint). Without
    sleeves (no symbol backtests) there is nothing to draw from."""
    if not len(s) and task.method != "walk_forward":
        return iter(())
    if task.method == "permutation":
        return permutation_draws(s, seed, task.task_index, task.draws)
    if task.method == "bootstrap":
        assert spec.bootstrap is not None
        returns = portfolio_returns(s.total(), s.start_equity) if len(s) else np.zeros(0)
        if len(returns) < 2:
            return iter(())
        return bootstrap_draws(returns, spec.bootstrap.block, seed, task.task_index, task.draws)
    if task.method == "monte_carlo":
        assert spec.monte_carlo is not None
        return cost_shock_draws(s, spec.monte_carlo, seed, task.task_index, task.draws)
    assert spec.walk_forward is not None
    return walk_forward_draws(s, spec.walk_forward, task, spec.walk_forward.chunk)


@dataclass(frozen=True)
class Part:
    """What one task produced: its draws (floats; a bootstrap draw is three) and the baseline it compared with;
    walk-forward: ``[position, symbol, result]`` rows in ``detail["symbols"]``."""

    method: Method
    task_index: int
    values: NDArray[np.float64]
    detail: dict[str, Any]


def run_task(s: Sleeves, spec: ValidationSpec, seed: int, task: Task) -> Part:
    """One task, start to end, in this process (what a Celery task does, without its checkpoints). ``s`` may
    hold every symbol of the run (a walk-forward task picks its own)."""
    return make_part(s, task, list(task_draws(s, spec, seed, task)))


def make_part(s: Sleeves, task: Task, draws: Sequence[Any]) -> Part:
    if task.method == "walk_forward":
        rows = [row for row in draws if row is not None]
        return Part(task.method, task.task_index, np.zeros(0), {"symbols": rows, "draws": len(draws)})
    values = np.asarray(draws, dtype=np.float64).ravel()
    return Part(task.method, task.task_index, values, {"baseline": baseline(s, task.method), "draws": len(draws)})


def combine(spec: ValidationSpec, seed: int, planned: Sequence[Task], parts: Sequence[Part]) -> dict[str, Any]:
    """The validation result of a run from the parts its tasks stored (in task order, so the result is the same
    whatever order they finished in). A method whose tasks did not all finish (a cancelled run) says so."""
    out: dict[str, Any] = {"seed": seed, "chunk": spec.chunk, "methods": {}}
    for method in spec.methods():
        tasks = [t for t in planned if t.method == method]
        mine = sorted((p for p in parts if p.method == method), key=lambda p: p.task_index)
        planned_draws = sum(t.draws for t in tasks)
        done = len(mine)
        drawn = sum(int(p.detail.get("draws", 0)) for p in mine)
        if method == "walk_forward":
            assert spec.walk_forward is not None
            rows = [row for p in mine for row in p.detail.get("symbols", [])]
            result: dict[str, Any] | None = walk_forward_result(rows, spec.walk_forward) | {"seed": seed}
        else:
            base = next((p.detail.get("baseline") for p in mine if p.detail.get("baseline")), None)
            values = np.concatenate([p.values for p in mine]) if mine else np.zeros(0)
            result = _method_result(spec, method, seed, base, values)
        out["methods"][method] = {
            **(result or {"method": method, "params": getattr(spec, method).model_dump(), "seed": seed}),
            "draws": drawn,
            "draws_planned": planned_draws,
            "tasks_done": done,
            "tasks_total": len(tasks),
            "complete": done == len(tasks) and drawn == planned_draws,
        }
    return out


def _method_result(
    spec: ValidationSpec, method: Method, seed: int, base: dict[str, Any] | None, values: NDArray[np.float64]
) -> dict[str, Any] | None:
    if base is None or not len(values):
        return None
    if method == "permutation":
        assert spec.permutation is not None
        observed = base["sharpe"] if base.get("sharpe") is not None else math.nan
        return permutation_result(observed, values.tolist(), spec.permutation, seed)
    if method == "bootstrap":
        assert spec.bootstrap is not None
        return bootstrap_result(base["stats"], values.reshape(-1, 3).tolist(), spec.bootstrap, seed)
    assert spec.monte_carlo is not None
    return cost_shock_result(base["final_equity"], values.tolist(), spec.monte_carlo, seed)


def validate_in_process(
    bars: Mapping[str, Bars], config: BacktestConfig, spec: ValidationSpec, backtester: Backtester | None = None
) -> dict[str, Any]:
    """Every task of the run's validation, one after the other, here: the reference a distributed run equals."""
    s = sleeves(bars, config, backtester=backtester)
    planned = plan(spec, len(config.symbols))
    return combine(spec, config.seed, planned, [run_task(s, spec, config.seed, t) for t in planned])
