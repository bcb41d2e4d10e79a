"""Parameter optimisation of a built-in strategy, as a job of kind ``optimization``.

An optimisation is a job on the same machinery as every job (``shared.jobs.pipeline``): its work is a list of parameter
combinations (a grid, or a seeded random sample of it) split into slices, one ``JobShard`` with a ``task`` per slice
(and per walk-forward window). A slice task scores its combos with the engine -- ``run_dual_sma_grid`` (one compiled
loop over the slice's (fast, slow) pairs) for dual SMA, ``run_backtest`` per combo for the other built-ins -- and
stores one row per combo in ``optimization_results`` (params and the eight summary metrics). Progress, events,
cancel, retries and the reconciler are the job machinery's; once the job is final, :func:`ensure_outcome` ranks
the rows and computes the best combo's full metrics (one ``run_backtest`` per symbol) or the walk-forward path.

Definitions (also in the README):

* Grid values per parameter: a list, or ``{start, stop, step}`` with ``stop`` inclusive. Combos are the cartesian
  product in parameter-name order; combinations the strategy rejects as a whole (dual SMA's ``fast >= slow``)
  are left out. Random search draws ``budget`` distinct combos of that grid with ``numpy.random.default_rng(seed)``
  (the whole grid when the budget covers it); combo indices follow grid order.
* Several symbols: a combo's metric is the mean over the symbols with bars in the period, except ``trades``
  which is their sum (a constraint like "at least 20 trades" reads naturally); NaN values are left out.
* Ranking: by the objective (``max`` or ``min``), ties broken by the lower combo index; a combo whose objective
  is undefined ranks last and is never "best". A constraint on an undefined metric fails.
* Walk-forward: windows on the calendar of the symbols' bar dates (``in_sample`` / ``out_of_sample`` bars, rolling
  or anchored, as ``shared.domain.robustness.windows``). The in-sample tasks score every combo on bars of the in-sample
  dates only; the choice per window is the best combo there under the constraints; out of sample, the choice
  trades from a flat position from the window's first bar (its indicators warmed on the past bars, never on later
  ones), and the stitched out-of-sample equity compounds the windows' equal-cash portfolio returns.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import io
import itertools
import json
import logging
import math
import uuid
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator
from pydantic import ValidationError as PydanticValidationError
from sqlalchemy import select, text, update
from sqlalchemy.orm import Session, sessionmaker

from shared.domain import robustness as val
from shared.domain.backtest import BacktestConfig, Bars, BarsError, run_backtest
from shared.domain.backtest.config import ScriptStrategySpec
from shared.domain.backtest.engine import run_events, strategy_signals
from shared.domain.backtest.grid import SUMMARY_NAMES, run_dual_sma_grid
from shared.domain.backtest.strategies import REGISTRY
from shared.errors import NotFound, ValidationFailed
from shared.infra.config import SandboxLimits
from shared.infra.db import session_scope
from shared.infra.events import JobEvents
from shared.infra.models import Job, JobKind, JobShard, Optimization, OptimizationResult, ScriptVersion, ShardStatus
from shared.jobs import pipeline as jobs
from shared.jobs.backtests import finalize as run_finalize
from shared.jobs.backtests import read as runs
from shared.jobs.backtests import shard as run_shards
from shared.jobs.backtests import submit as run_submit
from shared.jobs.calculations import symbols_sha256
from shared.library import strategy_scripts
from shared.marketdata.bars import load_bars

log = logging.getLogger(__name__)

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

MAX_RAW_GRID = 1_000_000
"""The cartesian product enumerated before combinations are checked (a random search samples from it)."""
GRID_MIN_SLICE_COMBOS = 100
"""A dual-SMA slice holds at least this many combos: each grid call per symbol has a fixed cost (averages, bins,
sizing) that thin slices of many symbols would pay over and over."""
SCRIPT_SLICE_COMBOS = 10
"""Default combos per slice of a script strategy (each combo is a sandbox run): many small slices spread over
workers (``ALPHAFORGE_SCRIPT_OPTIMIZATION_SLICE``)."""
MAX_SCRIPT_COMBOS = 200
"""Default bound on a script strategy's combos (``ALPHAFORGE_MAX_SCRIPT_COMBOS``)."""
CANCEL_CHECK_COMBOS = 250
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


# --- combos ------------------------------------------------------------------------------------------------------


def _field_adapter(strategy: str, name: str) -> TypeAdapter[Any]:
    info = REGISTRY[strategy].params.model_fields[name]
    return TypeAdapter(Annotated[(info.annotation, *info.metadata)])  # type: ignore[arg-type]


def _range_values(where: str, raw: list[float] | Range) -> list[float]:
    if isinstance(raw, Range):
        if raw.stop < raw.start:
            raise ValidationFailed.for_field(where, f"empty range: stop {raw.stop:g} is below start {raw.start:g}")
        count = math.floor((raw.stop - raw.start) / raw.step + 1e-9) + 1
        if count > MAX_RAW_GRID:
            raise ValidationFailed.for_field(where, f"{count:,} values; at most {MAX_RAW_GRID:,}")
        return [round(raw.start + i * raw.step, 10) for i in range(count)]
    return list(raw)


def script_parameter_values(declared: Mapping[str, Any], name: str, raw: list[float] | Range) -> list[Any]:
    """A strategy script's parameter values, each checked against its declaration (type, min, max)."""
    where = f"parameters.{name}"
    if name not in declared:
        known = ", ".join(declared) or "none"
        raise ValidationFailed.for_field(where, f"the script declares no parameter {name!r} (it declares: {known})")
    decl = strategy_scripts.ParameterDecl.model_validate(declared[name])
    if decl.type == "bool":
        raise ValidationFailed.for_field(where, "a bool parameter is not optimised (give it in strategy.params)")
    out = set()
    for v in _range_values(where, raw):
        if decl.type == "int" and float(v) != int(v):
            raise ValidationFailed.for_field(where, f"{v:g} is not a whole number ({name} is an int)")
        value: int | float = int(v) if decl.type == "int" else float(v)
        problem = strategy_scripts.check_value(decl, value)
        if problem:
            raise ValidationFailed.for_field(where, f"{v:g}: {problem}")
        out.add(value)
    return sorted(out)


def parameter_values(strategy: str, name: str, raw: list[float] | Range) -> list[Any]:
    """One parameter's values (sorted, distinct), each checked against the strategy's own field rules."""
    where = f"parameters.{name}"
    params_model = REGISTRY[strategy].params
    if name not in params_model.model_fields:
        known = ", ".join(params_model.model_fields) or "none"
        raise ValidationFailed.for_field(where, f"unknown parameter of {strategy} (its parameters: {known})")
    values = _range_values(where, raw)
    adapter = _field_adapter(strategy, name)
    is_int = params_model.model_fields[name].annotation is int
    out = set()
    for v in values:
        if is_int and float(v) != int(v):
            raise ValidationFailed.for_field(where, f"{v:g} is not a whole number ({name} is an integer)")
        try:
            out.add(adapter.validate_python(int(v) if is_int else float(v)))
        except PydanticValidationError as exc:
            raise ValidationFailed.for_field(where, f"{v:g}: {exc.errors()[0]['msg']}") from None
    return sorted(out)


@dataclass(frozen=True)
class Combos:
    names: tuple[str, ...]  # the optimised parameters, sorted
    values: list[tuple[Any, ...]]  # one tuple per combo, in combo-index order
    grid_size: int  # valid combos of the whole grid (random search samples from them)

    def params(self, index: int) -> dict[str, Any]:
        return dict(zip(self.names, self.values[index], strict=True))

    def __len__(self) -> int:
        return len(self.values)


def combos(spec: OptimizationSpec, declared: Mapping[str, Any] | None = None) -> Combos:
    """The spec's combos (deterministic): the valid grid, or the seeded sample of it. A script strategy's
    values are checked against its ``declared`` parameters (a script has no cross-parameter rules)."""
    strategy = spec.config.strategy.name
    names = tuple(spec.parameters)
    if strategy == "script":
        if declared is None:
            raise ValueError("a script strategy's combos need its declared parameters")
        axes = [script_parameter_values(declared, n, spec.parameters[n]) for n in names]
    else:
        axes = [parameter_values(strategy, n, spec.parameters[n]) for n in names]
    raw = math.prod(len(a) for a in axes)
    if raw > MAX_RAW_GRID:
        raise ValidationFailed.for_field(
            "parameters", f"the grid's cartesian product is {raw:,}; at most {MAX_RAW_GRID:,}"
        )
    base = spec.config.strategy.params.model_dump()
    valid: list[tuple[Any, ...]] = []
    if strategy == "script":
        valid = list(itertools.product(*axes))
    elif strategy == "dual_sma" and set(names) <= {"fast", "slow"}:  # the cross-field rule, without a model per combo
        for combo in itertools.product(*axes):
            p = {**base, **dict(zip(names, combo, strict=True))}
            if p["fast"] < p["slow"]:
                valid.append(combo)
    else:
        model = REGISTRY[strategy].params
        for combo in itertools.product(*axes):
            try:
                model.model_validate({**base, **dict(zip(names, combo, strict=True))})
            except PydanticValidationError:
                continue
            valid.append(combo)
    if not valid:
        raise ValidationFailed.for_field("parameters", f"no combination of these values is valid for {strategy}")
    chosen = valid
    if isinstance(spec.search, RandomSearch) and spec.search.budget < len(valid):
        rng = np.random.default_rng(spec.search.seed)
        picked = np.sort(rng.choice(len(valid), size=spec.search.budget, replace=False))
        chosen = [valid[int(i)] for i in picked]
    return Combos(names, chosen, len(valid))


def check_constraints(constraints: Sequence[Constraint]) -> None:
    """A 422 naming the constraint that can never hold (outside its metric's values, or against another)."""
    bounds = {m: [lo, hi, True, True] for m, (lo, hi) in METRIC_DOMAIN.items()}  # lo, hi, lo closed, hi closed
    for i, c in enumerate(constraints):
        b = bounds[c.metric]
        if c.op in (">=", ">"):
            if c.value > b[0] or (c.value == b[0] and c.op == ">"):
                b[0], b[2] = c.value, c.op == ">="
        elif c.value < b[1] or (c.value == b[1] and c.op == "<"):
            b[1], b[3] = c.value, c.op == "<="
        lo, hi, lo_closed, hi_closed = b
        if lo > hi or (lo == hi and not (lo_closed and hi_closed)):
            lo_, hi_ = METRIC_DOMAIN[c.metric]
            raise ValidationFailed.for_field(
                f"constraints[{i}]",
                f"{c.describe()} can never hold (with the constraints before it; {c.metric} lies in "
                f"[{lo_:g}, {hi_:g}])",
            )


# --- scoring -----------------------------------------------------------------------------------------------------


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


def _summary(metrics: Mapping[str, Any]) -> NDArray[np.float64]:
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
        rows[k] = _summary(run_backtest(cut, config_for(config, c.params(i))).metrics)
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


# --- walk-forward windows ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WindowDates:
    in_sample: tuple[dt.date, dt.date]
    out_of_sample: tuple[dt.date, dt.date]


def window_dates(calendar: Sequence[dt.date], wf: WalkForward) -> list[WindowDates]:
    """The windows of ``shared.domain.robustness.windows`` on the calendar (sorted distinct bar dates), as dates."""
    spec = val.WalkForwardSpec(
        in_sample=max(wf.in_sample, 50), out_of_sample=max(wf.out_of_sample, 10), anchored=wf.anchored
    )
    spec = spec.model_copy(update={"in_sample": wf.in_sample, "out_of_sample": wf.out_of_sample})
    return [
        WindowDates((calendar[w.in_start], calendar[w.in_end - 1]), (calendar[w.in_end], calendar[w.out_end - 1]))
        for w in val.windows(len(calendar), spec)
    ]


def _calendar(session: Session, config: BacktestConfig) -> list[dt.date]:
    rows = session.execute(
        text(
            "SELECT DISTINCT date FROM daily_bars WHERE symbol = ANY(CAST(:s AS varchar[]))"
            " AND (CAST(:start AS date) IS NULL OR date >= CAST(:start AS date))"
            " AND (CAST(:end AS date) IS NULL OR date <= CAST(:end AS date)) ORDER BY date"
        ),
        {"s": config.symbols, "start": config.start_date, "end": config.end_date},
    ).all()
    return [r[0] for r in rows]


# --- tasks -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    """One shard's work: combos ``[lo, hi)`` scored on window ``window`` (0 without walk-forward) between
    ``start`` and ``end`` (None: the config's own range)."""

    window: int
    lo: int
    hi: int
    start: str | None = None
    end: str | None = None
    oos_start: str | None = None
    oos_end: str | None = None
    work: int = 0  # backtests: combos x symbols

    def as_dict(self) -> dict[str, Any]:
        return {"kind": "optimization", **vars(self)}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Task:
        return cls(**{k: v for k, v in raw.items() if k != "kind"})


def plan(
    n_combos: int, n_symbols: int, slice_backtests: int, windows: Sequence[WindowDates] | None, min_combos: int = 1
) -> list[Task]:
    """Slices of about ``slice_backtests`` backtests (at least ``min_combos`` combos), per window."""
    per_slice = max(1, min_combos, slice_backtests // max(1, n_symbols))
    cuts = [(lo, min(lo + per_slice, n_combos)) for lo in range(0, n_combos, per_slice)]
    if windows is None:
        return [Task(0, lo, hi, work=(hi - lo) * n_symbols) for lo, hi in cuts]
    return [
        Task(
            w,
            lo,
            hi,
            str(wd.in_sample[0]),
            str(wd.in_sample[1]),
            str(wd.out_of_sample[0]),
            str(wd.out_of_sample[1]),
            (hi - lo) * n_symbols,
        )
        for w, wd in enumerate(windows)
        for lo, hi in cuts
    ]


@dataclass(frozen=True)
class Limits:
    max_combos: int  # ALPHAFORGE_MAX_GRID_COMBOS
    max_backtests: int  # ALPHAFORGE_MAX_OPTIMIZATION_BACKTESTS
    slice_backtests: int  # ALPHAFORGE_OPTIMIZATION_SLICE
    max_script_combos: int = MAX_SCRIPT_COMBOS  # ALPHAFORGE_MAX_SCRIPT_COMBOS: a sandbox run per combo
    script_slice_combos: int = SCRIPT_SLICE_COMBOS  # ALPHAFORGE_SCRIPT_OPTIMIZATION_SLICE: combos per script slice


@dataclass(frozen=True)
class OptimizationRequest:
    spec: OptimizationSpec
    owner_id: str
    name: str | None = None
    callback_url: str | None = None  # checked by shared/jobs/webhooks.validate_callback_url before it gets here


@dataclass(frozen=True)
class Submitted:
    job: Job
    optimization: Optimization
    created: bool


def find(session: Session, owner_id: str, spec_hash: str) -> tuple[Job, Optimization] | None:
    opt = session.scalar(
        select(Optimization).where(Optimization.owner_id == owner_id, Optimization.spec_hash == spec_hash)
    )
    if opt is None:
        return None
    job = session.get(Job, opt.job_id)
    assert job is not None
    return job, opt


def get(session: Session, job_id: uuid.UUID) -> tuple[Job, Optimization]:
    opt = session.get(Optimization, job_id)
    job = session.get(Job, job_id) if opt is not None else None
    if opt is None or job is None:
        raise NotFound(f"optimization {job_id} not found", details={"optimization_id": str(job_id)})
    return job, opt


def check(spec: OptimizationSpec, limits: Limits, declared: Mapping[str, Any] | None = None) -> Combos:
    """The combos, or a 422 naming the field: parameters, the configured bounds, the constraints."""
    check_constraints(spec.constraints)
    max_combos, what = limits.max_combos, "ALPHAFORGE_MAX_GRID_COMBOS"
    if spec.config.strategy.name == "script" and limits.max_script_combos < max_combos:
        max_combos, what = limits.max_script_combos, "ALPHAFORGE_MAX_SCRIPT_COMBOS"
    if isinstance(spec.search, RandomSearch) and spec.search.budget > max_combos:
        raise ValidationFailed.for_field(
            "search.budget", f"{spec.search.budget:,} combos; at most {max_combos:,} ({what})"
        )
    c = combos(spec, declared)
    if len(c) > max_combos:
        raise ValidationFailed.for_field(
            "parameters",
            f"the grid has {len(c):,} valid combos; at most {max_combos:,} per optimisation "
            f"({what}): narrow the ranges, or use a random search with a budget",
        )
    return c


def submit(
    factory: sessionmaker[Session],
    request: OptimizationRequest,
    limits: Limits,
    *,
    enqueue: jobs.Enqueue,
    max_active_per_owner: int | None = None,
    on_write: jobs.OnWrite | None = None,
    events: JobEvents | None = None,
) -> Submitted:
    """The owner's optimisation of this exact spec, or a new job: one shard per slice (and window). A script
    strategy is pinned first (version, complete params: ``strategy_scripts.pin_for_run``), so the hash names the
    exact code, and its code and declared parameters are kept with the optimisation."""
    spec = request.spec
    code: str | None = None
    declared: dict[str, Any] | None = None
    script_ref: tuple[uuid.UUID, int] | None = None
    if isinstance(spec.config.strategy, ScriptStrategySpec):
        with factory() as session:
            pinned, code = strategy_scripts.pin_for_run(session, request.owner_id, spec.config)
            assert isinstance(pinned.strategy, ScriptStrategySpec) and pinned.strategy.version is not None
            script_ref = (pinned.strategy.script_id, pinned.strategy.version)
            version = session.get(ScriptVersion, script_ref)
            declared = dict(version.parameters or {}) if version is not None else {}
        spec = spec.model_copy(update={"config": pinned})
        spec = OptimizationSpec.model_validate(spec.model_dump(mode="json"))
    spec_hash = spec.spec_hash
    with factory() as session:
        found = find(session, request.owner_id, spec_hash)
        if found is not None:
            return Submitted(found[0], found[1], created=False)
    c = check(spec, limits, declared)
    config = spec.config
    windows: list[WindowDates] | None = None
    with factory() as session:
        run_submit.check_symbols(session, config)
        if spec.walk_forward is not None:
            calendar = _calendar(session, config)
            windows = window_dates(calendar, spec.walk_forward)
            if not windows:
                need = spec.walk_forward.in_sample + 1
                raise ValidationFailed.for_field(
                    "walk_forward.in_sample",
                    f"the date range has {len(calendar):,} bar dates; one window needs more than {need - 1:,}",
                )
    backtests = len(c) * len(config.symbols) * (len(windows) if windows else 1)
    if backtests > limits.max_backtests:
        raise ValidationFailed.for_field(
            "parameters",
            f"{backtests:,} backtests (combos x symbols x windows); at most {limits.max_backtests:,} "
            "(ALPHAFORGE_MAX_OPTIMIZATION_BACKTESTS)",
        )
    if code is not None:
        tasks = plan(len(c), len(config.symbols), max(1, limits.script_slice_combos) * len(config.symbols), windows)
    else:
        grid = config.strategy.name == "dual_sma"
        tasks = plan(len(c), len(config.symbols), limits.slice_backtests, windows, GRID_MIN_SLICE_COMBOS if grid else 1)
    definition = spec.canonical_json()
    job = Job(
        kind=JobKind.OPTIMIZATION.value,
        owner_id=request.owner_id,
        column_name=f"optimization:{config.strategy.name}",
        script=definition,
        script_sha256=spec_hash,
        symbols=list(config.symbols),
        symbols_sha256=symbols_sha256(config.symbols),
        start_date=config.start_date,
        end_date=config.end_date,
        params={"parameters": list(c.names), "combos": len(c)},
        script_id=script_ref[0] if script_ref else None,
        script_version=script_ref[1] if script_ref else None,
        callback_url=request.callback_url,
        callback_state="pending" if request.callback_url else None,
    )
    opt = Optimization(
        strategy_code=code,
        script_parameters=declared,
        owner_id=request.owner_id,
        name=request.name,
        strategy=config.strategy.name,
        spec=spec.model_dump(mode="json"),
        spec_hash=spec_hash,
        combos=len(c),
    )

    def write(session: Session, written: Job) -> None:
        opt.job_id = written.id
        session.add(opt)
        session.flush()
        if on_write is not None:
            on_write(session, written)

    try:
        jobs.submit(
            factory,
            job,
            max(1, len(config.symbols)),
            enqueue,
            max_active_per_owner=max_active_per_owner,
            on_write=write,
            events=events,
            tasks_first=[t.as_dict() for t in tasks],
            shard_symbols=False,
        )
    except Exception as exc:
        import sqlalchemy.exc

        if not isinstance(exc, sqlalchemy.exc.IntegrityError):
            raise
        with factory() as session:
            found = find(session, request.owner_id, spec_hash)
            if found is None:
                raise
            session.expunge_all()
            return Submitted(found[0], found[1], created=False)
    return Submitted(job, opt, created=True)


# --- the shard -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Script:
    """A script strategy's pinned code and declared parameters, and how to run it in the sandbox."""

    code: str
    declared: dict[str, Any]
    limits: SandboxLimits
    runner: strategy_scripts.StrategyRunner | None = None


@dataclass(frozen=True)
class Loaded:
    """What a slice needs: the spec, its combos, the symbols' bars (the config's range), the script if any."""

    spec: OptimizationSpec
    combos: Combos
    bars: dict[str, Bars]
    script: Script | None


def load(
    factory: sessionmaker[Session],
    job_id: uuid.UUID,
    limits: SandboxLimits | None = None,
    runner: strategy_scripts.StrategyRunner | None = None,
) -> Loaded:
    with factory() as session:
        row = session.execute(
            select(Optimization.spec, Optimization.strategy_code, Optimization.script_parameters).where(
                Optimization.job_id == job_id
            )
        ).first()
        if row is None:
            raise RuntimeError(f"optimization {job_id} has no spec")
        spec = OptimizationSpec.model_validate(row[0])
        loaded = load_bars(session.connection(), spec.config.symbols, spec.config.start_date, spec.config.end_date)
    bars: dict[str, Bars] = {}
    for symbol in spec.config.symbols:
        own = loaded.get(symbol)
        if own is None:
            continue
        try:
            bars[symbol] = run_shards.engine_bars(own)
        except BarsError:
            continue
    script = None
    if spec.config.strategy.name == "script":
        if row[1] is None:
            raise RuntimeError(f"optimization {job_id} of a script strategy has no code")
        script = Script(row[1], dict(row[2] or {}), limits or SandboxLimits(), runner)
    return Loaded(spec, combos(spec, script.declared if script else None), bars, script)


class _ProcessCache:
    """The last optimisation of this process: its spec, combos and bars (a job's next slice skips loading them;
    all are pure functions of the stored spec and the bars)."""

    def __init__(self) -> None:
        self.key: uuid.UUID | None = None
        self.loaded: Loaded | None = None

    def get(
        self,
        factory: sessionmaker[Session],
        job_id: uuid.UUID,
        limits: SandboxLimits | None = None,
        runner: strategy_scripts.StrategyRunner | None = None,
    ) -> Loaded:
        if self.key != job_id or self.loaded is None:
            self.key, self.loaded = None, None
            self.loaded = load(factory, job_id, limits, runner)
            self.key = job_id
        return self.loaded


_CACHE = _ProcessCache()


def _clean(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


_UPSERT_ROWS = text(
    'INSERT INTO optimization_results (job_id, "window", combo_index, params, symbols, '
    + ", ".join(METRIC_NAMES)
    + ") SELECT CAST(:job_id AS uuid), :window, u.i, CAST(u.p AS jsonb), :symbols, "
    + ", ".join(f"u.{m}" for m in METRIC_NAMES)
    + " FROM unnest(CAST(:idx AS int[]), CAST(:params AS text[]), "
    + ", ".join(f"CAST(:{m} AS float8[])" for m in METRIC_NAMES)
    + ") AS u(i, p, "
    + ", ".join(METRIC_NAMES)
    + ') ON CONFLICT (job_id, "window", combo_index) DO UPDATE SET params = excluded.params, '
    + "symbols = excluded.symbols, "
    + ", ".join(f"{m} = excluded.{m}" for m in METRIC_NAMES)
)
"""One statement per chunk with a column array per field (a multi-row VALUES of thousands of rows costs ~30x
more to build and parse). A duplicate delivery computes the same rows (the engine is deterministic): the
upsert overwrites them harmlessly."""


def store_rows(
    factory: sessionmaker[Session],
    job_id: uuid.UUID,
    window: int,
    c: Combos,
    lo: int,
    summary: NDArray[np.float64],
    symbols: int,
) -> None:
    """Combos ``lo:lo + len(summary)`` of a window with their metrics (NaN stored as NULL)."""
    params = [json.dumps(c.params(lo + k), separators=(",", ":")) for k in range(len(summary))]
    values: dict[str, Any] = {
        "job_id": str(job_id),
        "window": window,
        "symbols": symbols,
        "params": params,
        "idx": list(range(lo, lo + len(summary))),
    }
    for j, name in enumerate(METRIC_NAMES):
        column = summary[:, j]
        values[name] = [None if not math.isfinite(x) else x for x in column.tolist()]
    with session_scope(factory) as session:
        session.execute(_UPSERT_ROWS, values)


def score_script(
    bars: Mapping[str, Bars], config: BacktestConfig, c: Combos, lo: int, hi: int, script: Script
) -> list[NDArray[np.float64]]:
    """Per symbol with bars, the summary of combos ``lo:hi`` of a script strategy: per combo the sandbox once
    for every symbol (``strategy_scripts.strategy_events``), then the engine; a symbol's error is a NaN row."""
    cuts = {s: b.between(config.start_date, config.end_date) for s, b in bars.items()}
    cuts = {s: b for s, b in cuts.items() if len(b) >= 2}
    out = {s: np.full((hi - lo, len(METRICS)), np.nan) for s in cuts}
    for k, i in enumerate(range(lo, hi)):
        cfg = config_for(config, c.params(i))
        params = cfg.strategy.params.model_dump()
        mapped = strategy_scripts.strategy_events(script.code, params, cuts, script.limits, cfg, runner=script.runner)
        for symbol, events in mapped.items():
            if isinstance(events, strategy_scripts.ScriptEvents):
                result = run_events(
                    cuts[symbol], events.events, cfg, warmup=events.warmup, entry_scale=events.entry_scale
                )
                out[symbol][k] = _summary(result.metrics)
    return list(out.values())


def evaluate_task(
    spec: OptimizationSpec,
    c: Combos,
    bars: Mapping[str, Bars],
    task: Task,
    lo: int,
    hi: int,
    script: Script | None = None,
) -> tuple[NDArray[np.float64], int]:
    """Combos ``lo:hi`` of the task scored over the symbols (aggregated); NaN rows when no symbol has bars."""
    config = spec.config
    if task.start is not None:
        config = config_for(
            config, start=dt.date.fromisoformat(task.start), end=dt.date.fromisoformat(task.end or ""), dates=True
        )
    if script is not None:
        scored_all = score_script({s: bars[s] for s in config.symbols if s in bars}, config, c, lo, hi, script)
        if not scored_all:
            return np.full((hi - lo, len(METRICS)), np.nan), 0
        return aggregate(scored_all)
    per_symbol = []
    for symbol in config.symbols:
        if symbol in bars:
            scored = score_symbol(bars[symbol], config, c, lo, hi)
            if scored is not None:
                per_symbol.append(scored)
    if not per_symbol:
        return np.full((hi - lo, len(METRICS)), np.nan), 0
    return aggregate(per_symbol)


def run_shard(
    factory: sessionmaker[Session],
    shard_id: int,
    *,
    events: JobEvents | None = None,
    limits: SandboxLimits | None = None,
    runner: strategy_scripts.StrategyRunner | None = None,
) -> bool | None:
    """One slice: score its combos in chunks, storing each chunk; between chunks, stop if the job was cancelled
    (what was scored is kept). None: nothing to do; True/False as ``jobs.complete_shard``. ``limits`` (and
    ``runner``): the sandbox of a script strategy."""
    started = jobs.start_shard(factory, shard_id, events=events)
    if started is None or started.task is None:
        return None
    task = Task.from_dict(started.task)
    loaded = _CACHE.get(factory, started.job.id, limits, runner)
    spec, c, bars = loaded.spec, loaded.combos, loaded.bars
    lo = task.lo
    while lo < task.hi:
        if spec.config.strategy.name == "dual_sma":
            hi = min(lo + CANCEL_CHECK_COMBOS * 8, task.hi)
        elif loaded.script is not None:
            hi = lo + 1  # a sandbox run per combo: look at the job after each
        else:
            hi = min(lo + max(1, CANCEL_CHECK_COMBOS // max(1, len(spec.config.symbols))), task.hi)
        summary, symbols = evaluate_task(spec, c, bars, task, lo, hi, loaded.script)
        store_rows(factory, started.job.id, task.window, c, lo, summary, symbols)
        lo = hi
        if lo < task.hi and not runs.job_is_active(factory, started.job.id):
            log.info("optimization shard %s: job no longer active, stopping at combo %s", shard_id, lo)
            break
    return jobs.complete_shard(factory, shard_id, [], events=events)


# --- reading ---------------------------------------------------------------------------------------------------


def load_summary(
    session: Session, job_id: uuid.UUID, window: int
) -> tuple[NDArray[np.int64], list[dict[str, Any]], NDArray[np.float64]]:
    """A window's rows: combo indices, params and the metric matrix (NULL as NaN), by combo index."""
    rows = session.execute(
        select(
            OptimizationResult.combo_index,
            OptimizationResult.params,
            *(getattr(OptimizationResult, n) for n in METRIC_NAMES),
        )
        .where(OptimizationResult.job_id == job_id, OptimizationResult.window == window)
        .order_by(OptimizationResult.combo_index)
    ).all()
    index = np.array([r[0] for r in rows], dtype=np.int64)
    params = [r[1] for r in rows]
    summary = np.array([[math.nan if v is None else v for v in r[2:]] for r in rows], dtype=np.float64)
    return index, params, summary.reshape(len(rows), len(METRICS))


def _metrics_view(summary_row: NDArray[np.float64]) -> dict[str, float | None]:
    return {name: _clean(summary_row[j]) for j, name in enumerate(METRIC_NAMES)}


def _full_run(factory: sessionmaker[Session], config: BacktestConfig, script: Script | None = None) -> dict[str, Any]:
    """``run_backtest`` of ``config`` per symbol (a script strategy: ``strategy_scripts.backtest_script``): each
    symbol's full metrics, and the equal-cash portfolio's."""
    with factory() as session:
        loaded = load_bars(session.connection(), config.symbols, config.start_date, config.end_date)
    symbols: dict[str, Any] = {}
    curves = []
    if script is not None:
        cuts = {}
        for symbol in config.symbols:
            try:
                if symbol in loaded:
                    cuts[symbol] = run_shards.engine_bars(loaded[symbol]).between(config.start_date, config.end_date)
            except BarsError as exc:
                symbols[symbol] = {"error": {"type": "BarsError", "message": str(exc)[:500], "line": None}}
        params = config.strategy.params.model_dump()
        for done in strategy_scripts.backtest_script(
            script.code, params, cuts, config, script.limits, runner=script.runner
        ):
            if done.result is None:
                symbols[done.symbol] = {"error": done.error}
                continue
            symbols[done.symbol] = {k: _clean(v) if isinstance(v, float) else v for k, v in done.result.metrics.items()}
            curves.append((done.result.dates.astype("datetime64[D]"), done.result.equity))
        config_symbols: list[str] = []
    else:
        config_symbols = list(config.symbols)
    for symbol in config_symbols:
        outcome = run_shards.backtest_symbol(symbol, loaded.get(symbol), config)
        symbols[symbol] = (
            (outcome.outcome.data or {}).get("metrics")
            if outcome.outcome.error is None
            else {"error": outcome.outcome.error}
        )
        if outcome.curve is not None:
            curves.append((outcome.curve.dates, outcome.curve.equity))
    doc: dict[str, Any] = {"symbols": symbols}
    if len(config.symbols) > 1:
        doc["portfolio"] = run_finalize.portfolio_metrics(curves, config.initial_cash, config.risk_free_rate)
    return doc


def _oos_curve(
    bars: Bars, config: BacktestConfig, params: Mapping[str, Any], task: Task, script: Script | None = None
) -> tuple[NDArray[np.datetime64], NDArray[np.float64]] | None:
    """The chosen params out of sample: signals on bars from the in-sample start (past only) to the window's end,
    events before the window dropped (it starts flat), equity from the window's first bar."""
    assert task.start and task.oos_start and task.oos_end
    cut = bars.between(dt.date.fromisoformat(task.start), dt.date.fromisoformat(task.oos_end))
    first = int(np.searchsorted(cut.dates, np.datetime64(task.oos_start)))
    if first >= len(cut):
        return None
    cfg = config_for(config, params, start=None, end=None, dates=True)
    scale = None
    if script is None:
        events = strategy_signals(cut, cfg).events.copy()
    else:
        mapped = strategy_scripts.strategy_events(
            script.code, cfg.strategy.params.model_dump(), {"oos": cut}, script.limits, cfg, runner=script.runner
        )["oos"]
        if not isinstance(mapped, strategy_scripts.ScriptEvents):
            return None
        events, scale = mapped.events.copy(), mapped.entry_scale
    events[:first] = 0
    result = run_events(cut, events, cfg, warmup=first, entry_scale=scale)
    return cut.dates[first:].astype("datetime64[D]"), result.equity[first:]


def walk_forward_outcome(
    factory: sessionmaker[Session],
    job_id: uuid.UUID,
    spec: OptimizationSpec,
    tasks: Sequence[Task],
    bars: Mapping[str, Bars],
    script: Script | None = None,
) -> dict[str, Any]:
    """Per window the in-sample choice (from that window's stored rows only) and its out-of-sample result; the
    stitched out-of-sample equity (each window's equal-cash portfolio, compounded)."""
    windows = {t.window: t for t in tasks}
    config = spec.config
    rows: list[dict[str, Any]] = []
    dates: list[str] = []
    equity: list[float] = []
    level = config.initial_cash
    for w in sorted(windows):
        t = windows[w]
        with factory() as session:
            index, params, summary = load_summary(session, job_id, w)
        best = best_index(summary, spec.objective, spec.constraints) if len(summary) else None
        row: dict[str, Any] = {
            "window": w,
            "in_sample": [t.start, t.end],
            "out_of_sample": [t.oos_start, t.oos_end],
            "chosen": None,
            "combo_index": None,
            "in_sample_metrics": None,
            "out_of_sample_return_pct": None,
        }
        if best is not None:
            row.update(
                chosen=params[best], combo_index=int(index[best]), in_sample_metrics=_metrics_view(summary[best])
            )
            curves = [
                cv for s in config.symbols if s in bars and (cv := _oos_curve(bars[s], config, params[best], t, script))
            ]
            if curves:
                days, total = run_finalize.portfolio_curve(curves, config.initial_cash)
                growth = total / (config.initial_cash * len(curves))
                dates.extend(str(d) for d in days)
                equity.extend((level * growth).tolist())
                row["out_of_sample_return_pct"] = (float(growth[-1]) - 1) * 100
                level *= float(growth[-1])
        rows.append(row)
    return {
        "mode": "anchored" if spec.walk_forward and spec.walk_forward.anchored else "rolling",
        "windows": rows,
        "parameter_path": [r["chosen"] for r in rows],
        "out_of_sample_return_pct": (level / config.initial_cash - 1) * 100,
        "equity": {"dates": dates, "equity": equity},
    }


def job_tasks(session: Session, job_id: uuid.UUID) -> list[tuple[Task, str]]:
    rows = session.execute(
        select(JobShard.task, JobShard.status)
        .where(JobShard.job_id == job_id, JobShard.task.is_not(None))
        .order_by(JobShard.index)
    ).all()
    return [(Task.from_dict(t), status) for t, status in rows]


def progress_counts(session: Session, job_id: uuid.UUID) -> tuple[int, int]:
    """(combos scored, combos planned), over every window (rows stored so far: a running slice stores chunks)."""
    planned = sum(t.hi - t.lo for t, _ in job_tasks(session, job_id))
    done = session.scalar(
        select(text("count(*)")).select_from(OptimizationResult).where(OptimizationResult.job_id == job_id)
    )
    return int(done or 0), planned


def ensure_outcome(
    factory: sessionmaker[Session],
    job: Job,
    opt: Optimization,
    *,
    limits: SandboxLimits | None = None,
    runner: strategy_scripts.StrategyRunner | None = None,
) -> dict[str, Any] | None:
    """Once the job is final and no slice is open: the ranking's head (best combo, with the full metrics of one
    ``run_backtest`` per symbol) or the walk-forward path; computed once, then kept. None before that. A script
    strategy's needs the sandbox: only a worker (given ``limits``) computes it."""
    if opt.outcome is not None:
        return opt.outcome
    if job.status not in runs.FINAL_STATUSES or (opt.strategy == "script" and limits is None):
        return None
    spec = OptimizationSpec.model_validate(opt.spec)
    with factory() as session:
        tasks = job_tasks(session, job.id)
        if any(status in (ShardStatus.QUEUED.value, ShardStatus.RUNNING.value) for _, status in tasks):
            return None
        scored, planned = progress_counts(session, job.id)
    outcome: dict[str, Any] = {
        "status": job.status,
        "combos_scored": scored,
        "combos_planned": planned,
        "best": None,
        "walk_forward": None,
    }
    loaded = load(factory, job.id, limits, runner)
    if spec.walk_forward is not None:
        outcome["walk_forward"] = _clean_doc(
            walk_forward_outcome(factory, job.id, spec, [t for t, _ in tasks], loaded.bars, loaded.script)
        )
    else:
        with factory() as session:
            index, params, summary = load_summary(session, job.id, 0)
        order = rank(summary, spec.objective, spec.constraints) if len(summary) else np.array([], dtype=np.int64)
        outcome["combos_passing"] = len(order)
        best = best_index(summary, spec.objective, spec.constraints) if len(summary) else None
        if best is not None:
            full = _full_run(factory, config_for(spec.config, params[best]), loaded.script)
            outcome["best"] = _clean_doc(
                {
                    "combo_index": int(index[best]),
                    "params": params[best],
                    "summary": _metrics_view(summary[best]),
                    "metrics": full["symbols"].get(spec.config.symbols[0]) if len(spec.config.symbols) == 1 else None,
                    **full,
                }
            )
    with session_scope(factory) as session:
        session.execute(
            update(Optimization)
            .where(Optimization.job_id == job.id, Optimization.outcome.is_(None))
            .values(outcome=outcome)
        )
    return outcome


def _clean_doc(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _clean_doc(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean_doc(v) for v in value]
    return value


# --- the ranked table ------------------------------------------------------------------------------------------


def _order(spec: OptimizationSpec) -> list[Any]:
    col = getattr(OptimizationResult, spec.objective.metric)
    primary = col.desc().nulls_last() if spec.objective.direction == "max" else col.asc().nulls_last()
    return [primary, OptimizationResult.combo_index]


def _passes(spec: OptimizationSpec) -> Any:
    from sqlalchemy import and_, true

    conds = []
    for c in spec.constraints:
        col = getattr(OptimizationResult, c.metric)
        conds.append({">=": col >= c.value, "<=": col <= c.value, ">": col > c.value, "<": col < c.value}[c.op])
    return and_(true(), *conds)


@dataclass(frozen=True)
class RankedRow:
    rank: int | None  # 1-based among the rows that pass; None for a filtered-out row
    combo_index: int
    window: int
    params: dict[str, Any]
    metrics: dict[str, float | None]
    symbols: int
    passed: bool
    reasons: list[str]


def ranked_page(
    session: Session,
    job_id: uuid.UUID,
    spec: OptimizationSpec,
    *,
    window: int,
    offset: int,
    limit: int,
    include_filtered: bool,
) -> tuple[list[RankedRow], int, int]:
    """A page of the ranked table: the rows passing every constraint, best first (ties: lower combo index);
    with ``include_filtered`` the rows that fail follow, each with its reasons. Also (passing, total) counts."""
    from sqlalchemy import case, func

    passes = _passes(spec)
    base = select(OptimizationResult).where(OptimizationResult.job_id == job_id, OptimizationResult.window == window)
    total = int(session.scalar(select(func.count()).select_from(base.subquery())) or 0)
    passing = int(session.scalar(select(func.count()).select_from(base.where(passes).subquery())) or 0)
    if include_filtered:
        # a NULL metric makes the condition NULL: such a row fails (coalesce to false)
        query = base.order_by(case((func.coalesce(passes, False), 0), else_=1), *_order(spec))
    else:
        query = base.where(passes).order_by(*_order(spec))
    out = []
    for i, r in enumerate(session.scalars(query.offset(offset).limit(limit))):
        metrics = {n: getattr(r, n) for n in METRIC_NAMES}
        reasons = failed_reasons(metrics, spec.constraints)
        position = offset + i
        out.append(
            RankedRow(
                position + 1 if not reasons and position < passing else None,
                r.combo_index,
                r.window,
                r.params,
                metrics,
                r.symbols,
                not reasons,
                reasons,
            )
        )
    return out, passing, total


# --- artifacts ---------------------------------------------------------------------------------------------------


def results_csv(
    spec: OptimizationSpec,
    index: NDArray[np.int64],
    params: Sequence[dict[str, Any]],
    summary: NDArray[np.float64],
    window: int = 0,
) -> bytes:
    """Every combo of a window, ranked (passing rows first, best first), with ``passed`` and the reasons."""
    order = rank(summary, spec.objective, spec.constraints)
    rest = np.setdiff1d(np.arange(len(summary)), order, assume_unique=True)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    names = list(spec.parameters)
    writer.writerow(["rank", "window", "combo_index", *names, *METRIC_NAMES, "passed", "reasons"])
    for position, i in enumerate([*order.tolist(), *rest.tolist()]):
        metrics = _metrics_view(summary[i])
        reasons = failed_reasons(metrics, spec.constraints)
        writer.writerow(
            [
                position + 1 if position < len(order) else "",
                window,
                int(index[i]),
                *(params[i].get(n) for n in names),
                *("" if metrics[m] is None else repr(metrics[m]) for m in METRIC_NAMES),
                not reasons,
                "; ".join(reasons),
            ]
        )
    return out.getvalue().encode()


def heatmap_png(
    spec: OptimizationSpec, params: Sequence[dict[str, Any]], summary: NDArray[np.float64], title: str
) -> bytes:
    """The objective over a two-parameter grid (blank: invalid, not drawn, or failing a constraint)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    x_name, y_name = list(spec.parameters)
    xs = sorted({p[x_name] for p in params})
    ys = sorted({p[y_name] for p in params})
    grid = np.full((len(ys), len(xs)), np.nan)
    col = summary[:, METRIC_NAMES.index(spec.objective.metric)]
    passing = np.zeros(len(summary), dtype=np.bool_)
    passing[rank(summary, spec.objective, spec.constraints)] = True
    xi = {v: i for i, v in enumerate(xs)}
    yi = {v: i for i, v in enumerate(ys)}
    for k, p in enumerate(params):
        if passing[k]:
            grid[yi[p[y_name]], xi[p[x_name]]] = col[k]
    fig = Figure(figsize=(9, 7), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    image = ax.imshow(
        grid,
        origin="lower",
        aspect="auto",
        cmap="viridis" if spec.objective.direction == "max" else "viridis_r",
        extent=(xs[0] - 0.5, xs[-1] + 0.5, ys[0] - 0.5, ys[-1] + 0.5) if len(xs) > 1 and len(ys) > 1 else None,
    )
    fig.colorbar(image, ax=ax, label=spec.objective.metric)
    best = best_index(summary, spec.objective, spec.constraints)
    if best is not None and len(xs) > 1 and len(ys) > 1:
        ax.scatter([params[best][x_name]], [params[best][y_name]], marker="*", s=180, color="#d62728", label="best")
        ax.legend(loc="upper left", fontsize=8)
    ax.set_xlabel(x_name)
    ax.set_ylabel(y_name)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png", metadata={"Software": None})
    return out.getvalue()


def render(
    job: Job,
    opt: Optimization,
    outcome: dict[str, Any],
    rows: Sequence[tuple[int, NDArray[np.int64], list[dict[str, Any]], NDArray[np.float64]]],
) -> dict[str, bytes]:
    """Every artifact's bytes (pure): ``optimization.json``, ``results.csv`` (every window's rows) and, for a
    two-parameter optimisation without walk-forward, ``heatmap.png``."""
    spec = OptimizationSpec.model_validate(opt.spec)
    doc = {
        "optimization_id": str(job.id),
        "status": job.status,
        "spec_hash": opt.spec_hash,
        "spec": opt.spec,
        "outcome": outcome,
    }
    files = {"optimization.json": json.dumps(doc, indent=1, allow_nan=False).encode()}
    parts = [results_csv(spec, index, params, summary, w) for w, index, params, summary in rows]
    if not parts:
        parts = [results_csv(spec, np.array([], dtype=np.int64), [], np.empty((0, len(METRICS))))]
    files["results.csv"] = parts[0] + b"".join(p.split(b"\n", 1)[1] for p in parts[1:])  # one header
    if len(spec.parameters) == 2 and spec.walk_forward is None and rows and len(rows[0][2]):
        title = (
            f"optimization {job.id} · {spec.config.strategy.name} · {spec.objective.direction} "
            f"{spec.objective.metric} · {len(rows[0][2])} combos"
        )
        files["heatmap.png"] = heatmap_png(spec, rows[0][2], rows[0][3], title)
    return files


def build_if_finished(
    factory: sessionmaker[Session],
    store: Any,
    job_id: uuid.UUID,
    *,
    limits: SandboxLimits | None = None,
    runner: strategy_scripts.StrategyRunner | None = None,
) -> Any:
    """The outcome and the artifacts (with their manifest, in the owner's chain) once the job is final and no
    slice is open; the existing manifest if built; None before."""
    from shared.jobs.backtests import artifacts

    with factory() as session:
        existing = artifacts.get_manifest(session, job_id)
        if existing is not None:
            return existing
        job, opt = get(session, job_id)
        session.expunge_all()
    outcome = ensure_outcome(factory, job, opt, limits=limits, runner=runner)
    if outcome is None:
        return None
    with factory() as session:
        windows = sorted({t.window for t, _ in job_tasks(session, job_id)})
        rows = [(w, *load_summary(session, job_id, w)) for w in windows]
    files = render(job, opt, outcome, rows)
    return artifacts.write_manifest(
        factory,
        store,
        job_id=job_id,
        owner_id=opt.owner_id,
        config_hash=opt.spec_hash,
        status=job.status,
        files=files,
    )
