"""One optimisation slice (a ``JobShard`` with a ``task``): score its combos with the engine -- ``run_dual_sma_grid``
(one compiled loop over the slice's (fast, slow) pairs) for dual SMA, ``run_backtest`` per combo for the other
built-ins, the sandbox then the engine for a strategy script -- in chunks, storing each chunk in
``optimization_results`` (params and the eight summary metrics), looking at the job's status between chunks."""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from sqlalchemy import select, text
from sqlalchemy.orm import Session, sessionmaker

from shared.domain.backtest import BacktestConfig, Bars, BarsError
from shared.domain.backtest.engine import run_events
from shared.domain.search.grid import Combos
from shared.domain.search.plan import Task
from shared.domain.search.scoring import aggregate, config_for, score_symbol, summary_of
from shared.domain.search.spec import METRIC_NAMES, METRICS, OptimizationSpec
from shared.infra.config import SandboxLimits
from shared.infra.db import session_scope
from shared.infra.events import JobEvents
from shared.infra.models import Optimization
from shared.jobs import pipeline as jobs
from shared.jobs.backtests import read as runs
from shared.jobs.backtests import shard as run_shards
from shared.jobs.optimizations.spec import combos
from shared.library import strategy_scripts

log = logging.getLogger(__name__)

CANCEL_CHECK_COMBOS = 250
"""A slice looks at its job's status (and stores what it computed) after this many combos per symbol."""


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
        return load_in(session, job_id, limits, runner)


def load_in(
    session: Session,
    job_id: uuid.UUID,
    limits: SandboxLimits | None = None,
    runner: strategy_scripts.StrategyRunner | None = None,
) -> Loaded:
    """:func:`load` with the caller's session (the finalization's transaction)."""
    row = session.execute(
        select(Optimization.spec, Optimization.strategy_code, Optimization.script_parameters).where(
            Optimization.job_id == job_id
        )
    ).first()
    if row is None:
        raise RuntimeError(f"optimization {job_id} has no spec")
    spec = OptimizationSpec.model_validate(row[0])
    config = spec.config
    loaded = run_shards.config_bars(session, config)
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
                out[symbol][k] = summary_of(result.metrics)
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
    finalize: jobs.Finalize | None = None,
) -> bool | None:
    """One slice: score its combos in chunks, storing each chunk; between chunks, stop if the job was cancelled
    (what was scored is kept). None: nothing to do; True/False as ``jobs.complete_shard``. ``limits`` (and
    ``runner``): the sandbox of a script strategy. ``finalize``: the kind's finalization (``pipeline.Finalize``:
    ``finalize.Finalizer``), which the pipeline runs in the transaction of the slice that ends the job (or, the job
    cancelled, closes its last open slice): the outcome commits with the final status."""
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
    return jobs.complete_shard(factory, shard_id, [], events=events, finalize=finalize)
