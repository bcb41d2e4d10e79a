"""What a backtest run's shards compute and store: a shard of symbols (load bars, ``run_backtest`` per symbol, store
its metrics as results and its equity curve), or a validation task (its draws, stored as a part).

Both end through ``pipeline.complete_shard`` with the run's finalization (:func:`.finalize.finalize_run`): the shard
that completes the run stores its portfolio and validation result in the same transaction that makes it final.
Between symbols (or draws) a shard looks whether its run was cancelled and, if so, stores what it finished and stops.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from sqlalchemy import select, text
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session, sessionmaker

from shared.domain import robustness as val
from shared.domain.backtest import BacktestConfig, BacktestResult, Bars, BarsError, run_backtest
from shared.infra.config import SandboxLimits
from shared.infra.db import session_scope
from shared.infra.events import JobEvents
from shared.infra.models import BacktestCurve, BacktestRun, RunValidationPart
from shared.infra.security import Incident, record
from shared.jobs import pipeline as jobs
from shared.jobs.backtests.finalize import finalize_run, finite
from shared.jobs.backtests.read import job_is_active, pack_dates, pack_values, run_config, run_validation_spec
from shared.library import strategy_scripts
from shared.marketdata.bars import DEFAULT_BATCH_BARS, SymbolBars, bar_batches, load_bars

log = logging.getLogger(__name__)

CANCEL_CHECK_INTERVAL_S = 0.25
"""A running shard looks at its job's status between symbols at most this often (its cancellation checkpoint)."""


def config_bars(
    session: Session, config: BacktestConfig, symbols: Sequence[str] | None = None
) -> dict[str, SymbolBars]:
    """The bars a run's config reads (its symbols, or ``symbols``): its date range, timeframe and adjustment."""
    wanted = config.symbols if symbols is None else symbols
    return load_bars(session.connection(), wanted, config.start_date, config.end_date, timeframe=config.timeframe,
                     adjustment=config.adjustment)  # fmt: skip


def engine_bars(bars: SymbolBars) -> Bars:
    """The database's bars as the engine takes them."""
    return Bars.from_arrays(
        open=bars.open,
        high=bars.high,
        low=bars.low,
        close=bars.close,
        volume=bars.volume,
        dates=bars.instants,
        timeframe=bars.timeframe,
    )


def _error(kind: str, message: str) -> dict[str, Any]:
    return {"type": kind, "message": message, "line": None}


@dataclass(frozen=True)
class Curve:
    dates: NDArray[np.datetime64]  # datetime64[D], or datetime64[s] for intraday bars
    equity: NDArray[np.float64]
    benchmark: NDArray[np.float64]  # the same cash in buy and hold from the first tradable bar
    trades: list[dict[str, Any]]


def pack_curve(curve: Curve) -> dict[str, Any]:
    """A curve's columns as stored (``read.load_curves`` reads them back)."""
    return {
        "dates": pack_dates(curve.dates),
        "equity": pack_values(curve.equity),
        "benchmark": pack_values(curve.benchmark),
        "trades": curve.trades,
    }


@dataclass(frozen=True)
class SymbolRun:
    outcome: jobs.Outcome
    curve: Curve | None


def backtest_symbol(symbol: str, bars: SymbolBars | None, config: BacktestConfig) -> SymbolRun:
    """One symbol: its metrics as the outcome (value = total return in %), and its equity curve."""
    if bars is None:
        start = config.start_date.isoformat() if config.start_date else "the first bar"
        end = config.end_date.isoformat() if config.end_date else "the last bar"
        message = f"no bars for {symbol} between {start} and {end}"
        return SymbolRun(jobs.Outcome(symbol, None, _error("NoData", message)), None)
    try:
        cut = engine_bars(bars).between(config.start_date, config.end_date)
        result = run_backtest(cut, config)
    except BarsError as exc:
        return SymbolRun(jobs.Outcome(symbol, None, _error("BarsError", str(exc)[:500])), None)
    return symbol_run(symbol, cut, result, config)


def symbol_run(
    symbol: str, cut: Bars, result: BacktestResult, config: BacktestConfig, incidents: tuple[Incident, ...] = ()
) -> SymbolRun:
    """A symbol's backtest result as stored: metrics in the outcome, the equity curve and its benchmark."""
    metrics = {key: finite(value) for key, value in result.metrics.items()}
    value = metrics.get("Return [%]")
    data = {"metrics": metrics, "orders": result.orders, "warmup_bars": result.warmup}
    outcome = jobs.Outcome(
        symbol, float(value) if isinstance(value, (int, float)) else None, None, incidents, data=data
    )
    first = max(0, min(result.warmup, len(cut) - 1))
    held = config.initial_cash * cut.close / cut.close[first]
    benchmark = np.where(np.arange(len(cut)) < first, config.initial_cash, held)
    trades = [{k: finite(v) for k, v in t.items()} for t in result.trades.to_records()]
    curve = Curve(result.dates, result.equity, benchmark.astype(np.float64), trades)
    return SymbolRun(outcome, curve)


def _store_curves(factory: sessionmaker[Session], job_id: uuid.UUID, runs: Sequence[SymbolRun]) -> list[jobs.Outcome]:
    """Store the runs' curves (in a transaction of their own, before the shard's results); their outcomes."""
    rows = [{"job_id": job_id, "symbol": r.outcome.symbol, **pack_curve(r.curve)} for r in runs if r.curve is not None]
    if not rows:
        return [r.outcome for r in runs]
    with session_scope(factory) as session:
        stmt = insert(BacktestCurve).values(rows)
        # A duplicate delivery computes the same curve (the engine is deterministic): overwriting is harmless.
        session.execute(
            stmt.on_conflict_do_update(
                index_elements=[BacktestCurve.job_id, BacktestCurve.symbol],
                set_={
                    "dates": stmt.excluded.dates,
                    "equity": stmt.excluded.equity,
                    "benchmark": stmt.excluded.benchmark,
                    "trades": stmt.excluded.trades,
                },
            )
        )
    return [r.outcome for r in runs]


def script_symbol_runs(
    symbols: Sequence[str],
    bars: dict[str, SymbolBars],
    config: BacktestConfig,
    code: str,
    limits: SandboxLimits,
    runner: strategy_scripts.StrategyRunner | None = None,
) -> list[SymbolRun]:
    """A shard of a script strategy: ONE sandbox process for the shard's symbols (fresh globals per symbol, as
    for calculations), then the engine per symbol; a symbol the script fails on gets the error naming why."""
    runs_by_symbol: dict[str, SymbolRun] = {}
    cuts: dict[str, Bars] = {}
    for symbol in symbols:
        own = bars.get(symbol)
        if own is None:
            runs_by_symbol[symbol] = backtest_symbol(symbol, None, config)
            continue
        try:
            cuts[symbol] = engine_bars(own).between(config.start_date, config.end_date)
        except BarsError as exc:
            runs_by_symbol[symbol] = SymbolRun(jobs.Outcome(symbol, None, _error("BarsError", str(exc)[:500])), None)
    params = config.strategy.params.model_dump(mode="json")
    if cuts:
        for done in strategy_scripts.backtest_script(code, params, cuts, config, limits, runner=runner):
            if done.result is None:
                assert done.error is not None
                outcome = jobs.Outcome(done.symbol, None, done.error, done.incidents)
                runs_by_symbol[done.symbol] = SymbolRun(outcome, None)
            else:
                runs_by_symbol[done.symbol] = symbol_run(done.symbol, cuts[done.symbol], done.result, config,
                                                         done.incidents)  # fmt: skip
    return [runs_by_symbol[s] for s in symbols]


def run_script_strategy(
    factory: sessionmaker[Session],
    started: jobs.StartedShard,
    config: BacktestConfig,
    limits: SandboxLimits,
    events: JobEvents | None = None,
    batch_bars: int = DEFAULT_BATCH_BARS,
) -> bool:
    job = started.job
    with factory() as session:
        code = session.scalar(select(BacktestRun.strategy_code).where(BacktestRun.job_id == job.id))
    if code is None:
        raise RuntimeError(f"run {job.id} has a script strategy but no code")
    done: list[jobs.Outcome] = []
    versions: dict[str, int] = {}
    for group, bars in _bar_batches(factory, started.symbols, config, batch_bars):
        runs = script_symbol_runs(group, bars, config, code, limits)
        versions |= {s: b.version for s, b in bars.items()}
        # Recorded before the results, in a transaction of their own, as a calculation shard does.
        record(factory, [(r.outcome.symbol, i) for r in runs for i in r.outcome.incidents], job_id=job.id,
               owner_id=job.owner_id)  # fmt: skip
        done += _store_curves(factory, job.id, runs)
    outcomes = jobs.read_at(done, versions)
    return jobs.complete_shard(factory, started.shard_id, outcomes, events=events, finalize=finalize_run)


def _bar_batches(
    factory: sessionmaker[Session], symbols: Sequence[str], config: BacktestConfig, batch_bars: int
) -> Iterator[tuple[list[str], dict[str, SymbolBars]]]:
    return bar_batches(factory, symbols, config.start_date, config.end_date, timeframe=config.timeframe,
                       adjustment=config.adjustment, max_bars=batch_bars)  # fmt: skip


def run_shard(
    factory: sessionmaker[Session],
    shard_id: int,
    *,
    events: JobEvents | None = None,
    limits: SandboxLimits | None = None,
    batch_bars: int = DEFAULT_BATCH_BARS,
) -> bool | None:
    """Run one shard of a backtest run. None: nothing to do (finished, cancelled or duplicate).
    True/False: whether this delivery's results were the ones stored.

    Between symbols the shard checks whether its run was cancelled and, if so, stores what it finished and
    stops (the job stays ``cancelled``; the finished symbols are kept)."""
    started = jobs.start_shard(factory, shard_id, events=events)
    if started is None:
        log.info("backtest shard %s: nothing to do (finished, cancelled or job inactive)", shard_id)
        return None
    job = started.job
    if started.task is not None:
        return run_validation_task(factory, started, events=events, limits=limits)
    with factory() as session:
        config = run_config(session, job.id)
    if config.strategy.name == "script":
        return run_script_strategy(factory, started, config, limits or SandboxLimits(), events, batch_bars)
    done: list[jobs.Outcome] = []
    versions: dict[str, int] = {}
    last_check = time.monotonic()
    cancelled = False
    for group, bars in _bar_batches(factory, started.symbols, config, batch_bars):
        versions |= {s: b.version for s, b in bars.items()}
        runs: list[SymbolRun] = []
        for symbol in group:
            if time.monotonic() - last_check >= CANCEL_CHECK_INTERVAL_S:
                last_check = time.monotonic()
                if cancelled := not job_is_active(factory, job.id):
                    log.info("backtest shard %s: run %s no longer active, stopping after %s symbols", shard_id,
                             job.id, len(done) + len(runs))  # fmt: skip
                    break
            runs.append(backtest_symbol(symbol, bars.get(symbol), config))
        done += _store_curves(factory, job.id, runs)  # a batch's curves leave memory with it
        if cancelled:
            break
    outcomes = jobs.read_at(done, versions)
    return jobs.complete_shard(factory, shard_id, outcomes, events=events, finalize=finalize_run)


# --- validation tasks -----------------------------------------------------------------------------------------


def run_sleeves(
    factory: sessionmaker[Session],
    config: BacktestConfig,
    positions: range | None = None,
    job_id: uuid.UUID | None = None,
    limits: SandboxLimits | None = None,
) -> val.Sleeves:
    """The run's symbols (or those at ``positions`` in the config) as the portfolio that validation works on:
    their bars in one query, each symbol's baseline backtest (a script strategy's through the sandbox: the
    run's pinned code, read with ``job_id``)."""
    wanted = config.symbols if positions is None else [config.symbols[p] for p in positions if p < len(config.symbols)]
    backtester = None
    with factory() as session:
        loaded = config_bars(session, config, wanted)
        if config.strategy.name == "script":
            code = session.scalar(select(BacktestRun.strategy_code).where(BacktestRun.job_id == job_id))
            if code is None:
                raise RuntimeError(f"run {job_id} has a script strategy but no code")
            params = config.strategy.params.model_dump(mode="json")
            backtester = strategy_scripts.ScriptBacktester(code, params, limits or SandboxLimits())
    bars: dict[str, Bars] = {}
    for symbol, own in loaded.items():
        try:
            bars[symbol] = engine_bars(own)
        except BarsError:
            continue  # the run's shard makes it this symbol's error; it is no sleeve
    return val.sleeves(bars, config, positions, backtester)


class SleevesCache:
    """The last run's sleeves of this process: its next task of that run skips loading every symbol's bars and
    the baseline backtests (seconds for hundreds of symbols). One entry, keyed by (run, positions); the
    sleeves are a pure function of the run's config and bars, so a task computes the same either way."""

    def __init__(self) -> None:
        self._key: tuple[uuid.UUID, range | None] | None = None
        self._sleeves: val.Sleeves | None = None

    def get(
        self,
        factory: sessionmaker[Session],
        job_id: uuid.UUID,
        config: BacktestConfig,
        positions: range | None,
        limits: SandboxLimits | None = None,
    ) -> val.Sleeves:
        key = (job_id, positions)
        if self._key != key or self._sleeves is None:
            self._key, self._sleeves = None, None  # drop the old one before loading the next
            self._sleeves = run_sleeves(factory, config, positions, job_id, limits)
            self._key = key
        return self._sleeves


_SLEEVES = SleevesCache()  # per worker process (prefork: one task at a time in it)


def run_validation_task(
    factory: sessionmaker[Session],
    started: jobs.StartedShard,
    *,
    events: JobEvents | None = None,
    limits: SandboxLimits | None = None,
) -> bool:
    """One validation task of a run: its own baseline (it never waits for the symbol shards), its draws with a
    cancellation checkpoint between two, its part stored (a cancelled run keeps the draws made), the shard
    completed like any other."""
    assert started.task is not None
    job = started.job
    task = val.Task.from_dict(started.task)
    with factory() as session:
        config = run_config(session, job.id)
        spec = run_validation_spec(session, job.id)
    if spec is None:
        raise RuntimeError(f"run {job.id} has a validation task but no validation spec")
    positions = val.task_positions(task, spec)
    sleeves = (
        run_sleeves(factory, config, positions, job.id, limits)
        if positions is not None
        else _SLEEVES.get(factory, job.id, config, None, limits)
    )
    draws: list[Any] = []
    last_check = time.monotonic()
    for draw in val.task_draws(sleeves, spec, config.seed, task):
        draws.append(draw)
        if time.monotonic() - last_check >= CANCEL_CHECK_INTERVAL_S:
            last_check = time.monotonic()
            if len(draws) < task.draws and not job_is_active(factory, job.id):
                log.info("validation task %s %s of run %s: run no longer active, stopping after %s of %s draws",
                         task.method, task.task_index, job.id, len(draws), task.draws)  # fmt: skip
                break
    store_part(factory, job.id, val.make_part(sleeves, task, draws))
    return jobs.complete_shard(factory, started.shard_id, [], events=events, finalize=finalize_run)


def store_part(factory: sessionmaker[Session], job_id: uuid.UUID, part: val.Part) -> None:
    row = {"job_id": job_id, "method": part.method, "task_index": part.task_index,
           "draws": part.values.astype("<f8").tobytes(), "detail": part.detail}  # fmt: skip
    with session_scope(factory) as session:
        stmt = insert(RunValidationPart).values([row])
        # A duplicate delivery computes the same draws (the stream is the task's): overwriting is harmless.
        session.execute(
            stmt.on_conflict_do_update(
                index_elements=[RunValidationPart.job_id, RunValidationPart.method, RunValidationPart.task_index],
                set_={"draws": stmt.excluded.draws, "detail": stmt.excluded.detail, "computed_at": text("now()")},
            )
        )
