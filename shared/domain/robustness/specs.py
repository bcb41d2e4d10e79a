"""The validation spec of a run and its split into tasks, with each task's random stream."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

Method = Literal["permutation", "bootstrap", "monte_carlo", "walk_forward"]
METHODS: tuple[Method, ...] = ("permutation", "monte_carlo", "bootstrap", "walk_forward")
METHOD_CODES = {"permutation": 1, "bootstrap": 2, "monte_carlo": 3}


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PermutationSpec(_Spec):
    n: int = Field(default=200, ge=10, le=10_000, description="number of permutations")


class BootstrapSpec(_Spec):
    n: int = Field(default=1000, ge=10, le=100_000, description="number of bootstrap samples")
    block: int = Field(default=20, ge=1, le=1000, description="block length in bars")
    confidence: float = Field(default=0.95, gt=0.5, lt=1)
    chunk: int = Field(
        default=1000, ge=1, le=100_000, description="draws per task (a draw resamples returns: no backtest)"
    )


class MonteCarloSpec(_Spec):
    n: int = Field(default=200, ge=10, le=10_000, description="number of cost scenarios")
    fee_bps_sigma: float = Field(default=5.0, ge=0, le=500)
    slippage_bps_sigma: float = Field(default=5.0, ge=0, le=500)


SelectionMetric = Literal["sharpe", "return_pct", "return_ann_pct", "max_drawdown_pct", "win_rate_pct"]
SELECTION_COLUMNS: dict[str, str] = {
    "sharpe": "Sharpe Ratio",
    "return_pct": "Return [%]",
    "return_ann_pct": "Return (Ann.) [%]",
    "max_drawdown_pct": "Max. Drawdown [%]",  # negative: the largest value is the smallest drawdown
    "win_rate_pct": "Win Rate [%]",
}
"""Metrics walk-forward can choose parameters by (all maximised), and their columns in the grid's summary."""


class WalkForwardSpec(_Spec):
    in_sample: int = Field(default=504, ge=50, le=20_000, description="bars of each in-sample window")
    out_of_sample: int = Field(default=126, ge=10, le=20_000, description="bars of each out-of-sample window")
    anchored: bool = Field(default=False, description="in-sample windows all start at the first bar")
    fast: list[int] = Field(default=[5, 10, 20], min_length=1, max_length=200)
    slow: list[int] = Field(default=[50, 100, 200], min_length=1, max_length=200)
    chunk: int = Field(default=50, ge=1, le=10_000, description="symbols per task")
    metric: SelectionMetric = Field(
        default="sharpe", description="what the in-sample choice maximises (max_drawdown_pct: the smallest drawdown)"
    )

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
    chunk: int = Field(default=50, ge=1, le=10_000, description="permutation and Monte Carlo draws per task")

    def methods(self) -> list[Method]:
        """The enabled methods, in the order their tasks are planned."""
        return [m for m in METHODS if getattr(self, m) is not None]


def task_rng(seed: int, method: str, task_index: int) -> np.random.Generator:
    """The random stream of one task: a function of (run seed, method, task index) only."""
    return np.random.default_rng(np.random.SeedSequence([seed, METHOD_CODES[method], task_index]))


def sleeve_rng(seed: int, method: str, task_index: int, position: int) -> np.random.Generator:
    """One symbol's stream within a task (``position``: the symbol's index in the config's symbols)."""
    return np.random.default_rng(np.random.SeedSequence([seed, METHOD_CODES[method], task_index, position]))


def task_plan(n: int, chunk: int) -> list[tuple[int, int]]:
    """(task index, draws) of each task: ``n`` draws in chunks of ``chunk``."""
    return [(k, min(chunk, n - start)) for k, start in enumerate(range(0, n, chunk))]


@dataclass(frozen=True)
class Task:
    """One unit of validation work (a Celery task of the run): ``draws`` draws of ``method`` from task index
    ``task_index``; for walk-forward, the symbols at positions ``[task_index * chunk, + draws)``. ``work`` estimates
    its cost in backtests (the baseline included), for the run's progress and the configured bounds."""

    method: Method
    task_index: int
    draws: int
    work: int

    def as_dict(self) -> dict[str, Any]:
        return {"method": self.method, "task_index": self.task_index, "draws": self.draws, "work": self.work}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Task:
        return cls(raw["method"], int(raw["task_index"]), int(raw["draws"]), int(raw.get("work", 0)))


def task_positions(task: Task, spec: ValidationSpec) -> range | None:
    """The config positions of the symbols a task needs: a walk-forward task its own; any other task, all."""
    if task.method != "walk_forward":
        return None
    assert spec.walk_forward is not None
    first = task.task_index * spec.walk_forward.chunk
    return range(first, first + task.draws)


def _pairs(spec: WalkForwardSpec) -> list[tuple[int, int]]:
    return [(f, s) for f in spec.fast for s in spec.slow if f < s]


def plan(spec: ValidationSpec, symbols: int) -> list[Task]:
    """Every task of a run's validation over ``symbols`` symbols. Each task runs the ``symbols`` baseline
    backtests itself (it depends on no other task); a permutation or Monte Carlo draw is ``symbols`` backtests;
    a bootstrap draw resamples returns (no backtest); walk-forward runs one grid per window per symbol."""
    tasks: list[Task] = []
    for method in spec.methods():
        if method == "walk_forward":
            assert spec.walk_forward is not None
            pairs = len(_pairs(spec.walk_forward))
            chunk = spec.walk_forward.chunk
            tasks += [Task(method, k, d, d * (1 + pairs)) for k, d in task_plan(symbols, chunk)]
            continue
        if method == "bootstrap":
            assert spec.bootstrap is not None
            tasks += [Task(method, k, d, symbols) for k, d in task_plan(spec.bootstrap.n, spec.bootstrap.chunk)]
            continue
        n = getattr(spec, method).n
        tasks += [Task(method, k, d, symbols + d * symbols) for k, d in task_plan(n, spec.chunk)]
    return tasks
