"""What a parameter search is: the metrics a combo is scored on, and the spec (grid or random search, objective,
constraints, walk-forward) whose canonical JSON's SHA-256 makes an optimisation idempotent per owner."""

from __future__ import annotations

import hashlib
import json
import math
from typing import Annotated, Any, Literal

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field, field_validator

from shared.domain.backtest import BacktestConfig
from shared.domain.backtest.grid import SUMMARY_NAMES

METRICS: dict[str, str] = {
    "equity_final": "Equity Final [$]",
    "return_pct": "Return [%]",
    "return_ann_pct": "Return (Ann.) [%]",
    "volatility_ann_pct": "Volatility (Ann.) [%]",
    "sharpe": "Sharpe Ratio",
    "max_drawdown_pct": "Max. Drawdown [%]",
    "trades": "# Trades",
    "win_rate_pct": "Win Rate [%]",
}
"""The metrics a combo is scored on (API name -> engine name), the grid kernel's summary in its order."""
METRIC_NAMES = tuple(METRICS)
assert tuple(METRICS.values()) == SUMMARY_NAMES
TRADES = METRIC_NAMES.index("trades")

METRIC_DOMAIN: dict[str, tuple[float, float]] = {
    "equity_final": (0.0, math.inf),
    "return_pct": (-100.0, math.inf),
    "return_ann_pct": (-100.0, math.inf),
    "volatility_ann_pct": (0.0, math.inf),
    "sharpe": (-math.inf, math.inf),
    "max_drawdown_pct": (-100.0, 0.0),
    "trades": (0.0, math.inf),
    "win_rate_pct": (0.0, 100.0),
}
"""Values each metric can take: a constraint outside them can never hold."""


"""A slice looks at its job's status (and stores what it computed) after this many combos per symbol."""

Metric = Literal[
    "equity_final",
    "return_pct",
    "return_ann_pct",
    "volatility_ann_pct",
    "sharpe",
    "max_drawdown_pct",
    "trades",
    "win_rate_pct",
]
Op = Literal[">=", "<=", ">", "<"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


ParameterValue = Annotated[float, Field(allow_inf_nan=False, ge=-1e9, le=1e9)]
"""A searched value: finite and of a sane size (every strategy parameter is far inside this)."""


class Range(_Model):
    start: ParameterValue
    stop: ParameterValue = Field(description="inclusive")
    step: ParameterValue = Field(gt=0)


Values = Annotated[list[ParameterValue], Field(min_length=1, max_length=10_000)] | Range


class GridSearch(_Model):
    method: Literal["grid"] = "grid"


class RandomSearch(_Model):
    method: Literal["random"]
    budget: int = Field(ge=1, le=10_000_000, description="combos drawn (without replacement) from the grid")
    seed: int = Field(ge=0, le=2**63 - 1)


class Objective(_Model):
    metric: Metric = "sharpe"
    direction: Literal["max", "min"] = "max"


class Constraint(_Model):
    metric: Metric
    op: Op
    value: float = Field(allow_inf_nan=False)

    def holds(self, x: NDArray[np.float64]) -> NDArray[np.bool_]:
        with np.errstate(invalid="ignore"):
            if self.op == ">=":
                out = x >= self.value
            elif self.op == "<=":
                out = x <= self.value
            elif self.op == ">":
                out = x > self.value
            else:
                out = x < self.value
        return np.asarray(out & ~np.isnan(x))

    def describe(self) -> str:
        return f"{self.metric} {self.op} {self.value:g}"


class WalkForward(_Model):
    in_sample: int = Field(ge=20, le=20_000, description="bars (of the symbols' date calendar) per in-sample window")
    out_of_sample: int = Field(ge=5, le=20_000, description="bars per out-of-sample window")
    anchored: bool = Field(default=False, description="every in-sample window starts at the first bar")


class OptimizationSpec(_Model):
    """What an optimisation computes; its canonical JSON's SHA-256 makes creation idempotent per owner."""

    config: BacktestConfig
    parameters: dict[str, Values] = Field(min_length=1, max_length=8)
    search: Annotated[GridSearch | RandomSearch, Field(discriminator="method")] = GridSearch()
    objective: Objective = Objective()
    constraints: list[Constraint] = Field(default=[], max_length=20)
    walk_forward: WalkForward | None = None

    @field_validator("parameters")
    @classmethod
    def _sorted(cls, value: dict[str, Any]) -> dict[str, Any]:
        return dict(sorted(value.items()))

    def canonical_json(self) -> str:
        return json.dumps(
            self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        )

    @property
    def spec_hash(self) -> str:
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()
