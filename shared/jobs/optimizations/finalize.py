"""What runs once when an optimisation has ended: its outcome (the ranking's head with the best combo's full metrics
from one ``run_backtest`` per symbol, or the walk-forward path with the stitched out-of-sample equity), stored in
``optimizations.outcome`` for its views to read.

:class:`Finalizer` is the kind's finalization hook (``shared.jobs.pipeline.Finalize``): the pipeline calls it in a
worker only, in the transaction that makes the job final (the slice that completes it) or, for one cancelled while
slices ran, in the one that closes its last open slice; for one that ended with no slice left to close (cancelled
while every slice waited), in the worker task the cancel sends (``TASK_FINISH_OPTIMIZATION``), and the reconciler's
finalize pass catches up on any nobody finalized. So the outcome commits with the final status: nobody reads the
status final without it. Readers (the API) only read the row. The artifacts (files) are built after that commit
(:mod:`.artifacts`).

Walk-forward out of sample: the window's choice trades from a flat position from the window's first bar (its
indicators warmed on the past bars, never on later ones), and the stitched out-of-sample equity compounds the
windows' equal-cash portfolio returns.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from sqlalchemy import update
from sqlalchemy.orm import Session

from shared.domain.backtest import BacktestConfig, Bars, BarsError
from shared.domain.backtest.engine import run_events, strategy_signals
from shared.domain.search.plan import Task
from shared.domain.search.scoring import best_index, clean, clean_doc, config_for, metrics_view, rank
from shared.domain.search.spec import OptimizationSpec
from shared.infra.config import SandboxLimits
from shared.infra.models import Job, Optimization
from shared.jobs.backtests import finalize as run_finalize
from shared.jobs.backtests import shard as run_shards
from shared.jobs.optimizations import read
from shared.jobs.optimizations.shard import Script, load_in
from shared.library import strategy_scripts


def full_run(session: Session, config: BacktestConfig, script: Script | None = None) -> dict[str, Any]:
    """``run_backtest`` of ``config`` per symbol (a script strategy: ``strategy_scripts.backtest_script``): each
    symbol's full metrics, and the equal-cash portfolio's. Bars read with the caller's session."""
    loaded = run_shards.config_bars(session, config)
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
            symbols[done.symbol] = {k: clean(v) if isinstance(v, float) else v for k, v in done.result.metrics.items()}
            curves.append((done.result.dates, done.result.equity))
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


def oos_curve(
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
    return cut.dates[first:], result.equity[first:]


def walk_forward_outcome(
    session: Session,
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
        index, params, summary = read.load_summary(session, job_id, w)
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
            row.update(chosen=params[best], combo_index=int(index[best]), in_sample_metrics=metrics_view(summary[best]))
            curves = [
                cv for s in config.symbols if s in bars and (cv := oos_curve(bars[s], config, params[best], t, script))
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


def compute_outcome(
    session: Session,
    job: Job,
    opt: Optimization,
    *,
    limits: SandboxLimits | None = None,
    runner: strategy_scripts.StrategyRunner | None = None,
) -> dict[str, Any]:
    """The ranking's head (best combo, with the full metrics of one ``run_backtest`` per symbol, or the script's
    sandbox then the engine) or the walk-forward path, from the stored rows; ``job.status`` is the job's final
    status. Reads with the caller's session; writes nothing."""
    spec = OptimizationSpec.model_validate(opt.spec)
    tasks = [t for t, _ in read.job_tasks(session, job.id)]
    scored, planned = read.progress_counts(session, job.id)
    outcome: dict[str, Any] = {
        "status": job.status,
        "combos_scored": scored,
        "combos_planned": planned,
        "best": None,
        "walk_forward": None,
    }
    loaded = load_in(session, job.id, limits, runner)
    if spec.walk_forward is not None:
        outcome["walk_forward"] = clean_doc(
            walk_forward_outcome(session, job.id, spec, tasks, loaded.bars, loaded.script)
        )
        return outcome
    index, params, summary = read.load_summary(session, job.id, 0)
    order = rank(summary, spec.objective, spec.constraints) if len(summary) else np.array([], dtype=np.int64)
    outcome["combos_passing"] = len(order)
    best = best_index(summary, spec.objective, spec.constraints) if len(summary) else None
    if best is not None:
        full = full_run(session, config_for(spec.config, params[best]), loaded.script)
        outcome["best"] = clean_doc(
            {
                "combo_index": int(index[best]),
                "params": params[best],
                "summary": metrics_view(summary[best]),
                "metrics": full["symbols"].get(spec.config.symbols[0]) if len(spec.config.symbols) == 1 else None,
                **full,
            }
        )
    return outcome


def finalize_optimization(
    session: Session,
    job: Job,
    *,
    limits: SandboxLimits | None = None,
    runner: strategy_scripts.StrategyRunner | None = None,
) -> None:
    """Store the outcome of the ended optimisation ``job`` in the caller's transaction (the pipeline holds the job's
    row lock and commits). An outcome already stored is kept (optimisations viewed before this hook existed had it
    computed on a read)."""
    opt = session.get(Optimization, job.id)
    if opt is None:
        raise RuntimeError(f"optimization {job.id} has no optimization row")
    if opt.outcome is not None:
        return
    outcome = compute_outcome(session, job, opt, limits=limits, runner=runner)
    session.execute(update(Optimization).where(Optimization.job_id == job.id).values(outcome=outcome))


@dataclass(frozen=True)
class Finalizer:
    """The optimisation kind's finalization (``shared.jobs.pipeline.Finalize``), bound to a worker's sandbox limits
    (a script strategy's best combo runs in the sandbox)."""

    limits: SandboxLimits | None = None
    runner: strategy_scripts.StrategyRunner | None = None

    def __call__(self, session: Session, job: Job) -> None:
        finalize_optimization(session, job, limits=self.limits, runner=self.runner)
