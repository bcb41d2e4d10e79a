"""Scoring combos with the engine and ranking them (pure).

* Several symbols: a combo's metric is the mean over the symbols with bars in the period, except ``trades``
  which is their sum (a constraint like "at least 20 trades" reads naturally); NaN values are left out.
* Ranking: by the objective (``max`` or ``min``), ties broken by the lower combo index; a combo whose objective
  is undefined ranks last and is never "best". A constraint on an undefined metric fails.
"""

from __future__ import annotations

import datetime as dt
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from shared.domain.backtest import BacktestConfig, Bars, run_backtest
from shared.domain.backtest.grid import SUMMARY_NAMES, run_dual_sma_grid
from shared.domain.search.grid import Combos
from shared.domain.search.spec import METRIC_NAMES, METRICS, TRADES, Constraint, Objective


def config_for(
    config: BacktestConfig,
    params: Mapping[str, Any] | None = None,
    *,
    start: dt.date | None = None,
    end: dt.date | None = None,
    dates: bool = False,
) -> BacktestConfig:
    """The config with strategy params changed and (``dates``) the date range replaced, validated again."""
    doc = config.model_dump(mode="json")
    if params:
        doc["strategy"]["params"] = {**doc["strategy"]["params"], **params}
    if dates:
        doc["start_date"] = start.isoformat() if start else None
        doc["end_date"] = end.isoformat() if end else None
    return BacktestConfig.model_validate(doc)


def summary_of(metrics: Mapping[str, Any]) -> NDArray[np.float64]:
    out = np.empty(len(METRICS))
    for i, name in enumerate(SUMMARY_NAMES):
        v = metrics.get(name)
        out[i] = float(v) if isinstance(v, (int, float)) else math.nan
    return out


def score_symbol(bars: Bars, config: BacktestConfig, c: Combos, lo: int, hi: int) -> NDArray[np.float64] | None:
    """Summary metrics (rows: combos ``lo:hi``, columns: METRICS) of one symbol on ``config``'s date range; None
    when it has fewer than two bars there."""
    cut = bars.between(config.start_date, config.end_date)
    if len(cut) < 2:
        return None
    if config.strategy.name == "dual_sma":
        params = [c.params(i) for i in range(lo, hi)]
        base = config.strategy.params.model_dump()
        fast = np.array([p.get("fast", base["fast"]) for p in params], dtype=np.int64)
        slow = np.array([p.get("slow", base["slow"]) for p in params], dtype=np.int64)
        return run_dual_sma_grid(cut, fast, slow, config).summary
    rows = np.empty((hi - lo, len(METRICS)))
    for k, i in enumerate(range(lo, hi)):
        rows[k] = summary_of(run_backtest(cut, config_for(config, c.params(i))).metrics)
    return rows


def aggregate(per_symbol: Sequence[NDArray[np.float64]]) -> tuple[NDArray[np.float64], int]:
    """Across symbols: the mean of every metric (NaN left out), ``trades`` summed; and how many symbols."""
    stack = np.stack(per_symbol)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        out = np.nanmean(stack, axis=0)
    out[:, TRADES] = np.nansum(stack[:, :, TRADES], axis=0)
    return out, len(per_symbol)


def rank(summary: NDArray[np.float64], objective: Objective, constraints: Sequence[Constraint]) -> NDArray[np.int64]:
    """Row indices that pass every constraint, best first (ties: lower index); undefined objectives last."""
    passing = np.ones(len(summary), dtype=np.bool_)
    for c in constraints:
        passing &= c.holds(summary[:, METRIC_NAMES.index(c.metric)])
    idx = np.flatnonzero(passing)
    score = summary[idx, METRIC_NAMES.index(objective.metric)]
    key = np.where(np.isnan(score), np.inf, -score if objective.direction == "max" else score)
    return idx[np.lexsort((idx, key))].astype(np.int64)


def best_index(summary: NDArray[np.float64], objective: Objective, constraints: Sequence[Constraint]) -> int | None:
    order = rank(summary, objective, constraints)
    if not len(order) or np.isnan(summary[order[0], METRIC_NAMES.index(objective.metric)]):
        return None
    return int(order[0])


def failed_reasons(metrics: Mapping[str, float | None], constraints: Sequence[Constraint]) -> list[str]:
    out = []
    for c in constraints:
        v = metrics.get(c.metric)
        x = np.array([math.nan if v is None else v])
        if not c.holds(x)[0]:
            out.append(f"{c.describe()} fails: {c.metric} is " + ("undefined" if v is None else f"{v:g}"))
    return out


def clean(x: float) -> float | None:
    """A float for JSON: None for NaN and infinities."""
    return float(x) if math.isfinite(x) else None


def metrics_view(summary_row: NDArray[np.float64]) -> dict[str, float | None]:
    """One row of a summary matrix by metric name (undefined values None)."""
    return {name: clean(summary_row[j]) for j, name in enumerate(METRIC_NAMES)}


def clean_doc(value: Any) -> Any:
    """A JSON document with every non-finite float replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: clean_doc(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean_doc(v) for v in value]
    return value
