"""Backtest runs: the engine's config over many symbols, as a job of kind ``backtest``.

A run is a job like a calculation job (``shared.jobs.pipeline``: the same shards, counters, finalization and cancel);
this module adds what only a run has: creation that is idempotent per owner on the config's canonical hash,
symbol checks before anything is written, the shard body (load bars, ``run_backtest`` per symbol, store its
metrics and equity curve) with a cancellation checkpoint between symbols, and portfolio-level metrics.

Validation (``shared.domain.robustness``) rides on the same machinery: its tasks are extra shards of the run's job that
carry a task description (``JobShard.task``) instead of symbols, run by the same shard task
(:func:`run_shard` dispatches on it), each storing its draws in ``run_validation_parts``; the parts are combined
into the run's validation result once the run is final (:func:`ensure_validation`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import sqlalchemy.exc
from numpy.typing import NDArray
from sqlalchemy import select, text, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session, sessionmaker

from shared.domain import robustness as val
from shared.domain.backtest import BacktestConfig, BacktestResult, Bars, BarsError, run_backtest
from shared.errors import NotFound, ValidationFailed
from shared.infra.config import SandboxLimits
from shared.infra.db import session_scope
from shared.infra.events import JobEvents
from shared.infra.models import (
    BacktestCurve,
    BacktestRun,
    Job,
    JobKind,
    JobShard,
    JobStatus,
    RunValidationPart,
    ShardStatus,
    Symbol,
)
from shared.infra.security import Incident, record
from shared.jobs import pipeline as jobs
from shared.jobs.calculations import symbols_sha256
from shared.library import strategy_scripts
from shared.marketdata.bars import SymbolBars, load_bars

log = logging.getLogger(__name__)

FINAL_STATUSES = frozenset(
    {JobStatus.SUCCEEDED.value, JobStatus.PARTIAL.value, JobStatus.FAILED.value, JobStatus.CANCELLED.value}
)
CANCEL_CHECK_INTERVAL_S = 0.25
"""A running shard looks at its job's status between symbols at most this often (its cancellation checkpoint)."""

# The per-symbol metrics repeated in a run's summary (the full set is in the run's results).
SUMMARY_METRICS = {
    "return_pct": "Return [%]",
    "buy_and_hold_return_pct": "Buy & Hold Return [%]",
    "sharpe": "Sharpe Ratio",
    "max_drawdown_pct": "Max. Drawdown [%]",
    "trades": "# Trades",
    "win_rate_pct": "Win Rate [%]",
}


@dataclass(frozen=True)
class RunRequest:
    config: BacktestConfig
    owner_id: str
    name: str | None = None
    callback_url: str | None = None  # checked by shared/jobs/webhooks.validate_callback_url before it gets here
    validation: val.ValidationSpec | None = None  # None (or no method enabled): no validation
    strategy_code: str | None = None  # a script strategy's pinned code (shared.library.strategy_scripts.pin_for_run)

    @property
    def definition(self) -> tuple[str, str]:
        return run_definition(self.config, self.validation)


def run_definition(config: BacktestConfig, validation: val.ValidationSpec | None) -> tuple[str, str]:
    """(canonical JSON, SHA-256) of what a run computes: the config's own when there is no validation (so a
    run without validation keeps the config's hash), else the config and the validation spec together. The hash
    makes creation idempotent: same config and same validation, same run; another validation, another run."""
    if validation is None or not validation.methods():
        return config.canonical_json(), config.config_hash
    doc = {"config": json.loads(config.canonical_json()), "validation": validation.model_dump(mode="json")}
    text_ = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return text_, hashlib.sha256(text_.encode()).hexdigest()


@dataclass(frozen=True)
class ValidationLimits:
    max_backtests: int  # the whole validation, in backtests (Task.work summed)
    max_task_backtests: int  # one task (keeps a task well inside the Celery time limit)
    max_script_backtests: int = 20_000  # a script strategy's permutation test: draws x symbols through the sandbox


def check_validation(config: BacktestConfig, spec: val.ValidationSpec, limits: ValidationLimits) -> list[val.Task]:
    """The tasks of a run's validation, or a 422 naming the field: walk-forward re-optimises dual SMA only; the
    total work (draws x symbols, plus each task's own baseline) and one task's work are bounded by config."""
    if spec.walk_forward is not None and config.strategy.name != "dual_sma":
        raise ValidationFailed.for_field(
            "validation.walk_forward", f"walk-forward re-optimises the dual_sma strategy, not {config.strategy.name}"
        )
    if spec.permutation is not None and config.strategy.name == "script":
        sandboxed = spec.permutation.n * len(config.symbols)
        if sandboxed > limits.max_script_backtests:
            raise ValidationFailed.for_field(
                "validation.permutation.n",
                f"{sandboxed:,} permuted backtests of a script strategy (n x {len(config.symbols)} symbols), each "
                f"through the sandbox; at most {limits.max_script_backtests:,} per run "
                "(ALPHAFORGE_MAX_SCRIPT_VALIDATION_BACKTESTS): use fewer permutations or symbols",
            )
    tasks = val.plan(spec, len(config.symbols))
    total = sum(t.work for t in tasks)
    if total > limits.max_backtests:
        raise ValidationFailed.for_field(
            "validation",
            f"{total:,} backtests (draws x {len(config.symbols)} symbols, plus each task's baseline); at most "
            f"{limits.max_backtests:,} per run (ALPHAFORGE_MAX_VALIDATION_BACKTESTS): use fewer draws or symbols",
        )
    heaviest = max((t.work for t in tasks), default=0)
    if heaviest > limits.max_task_backtests:
        raise ValidationFailed.for_field(
            "validation.chunk",
            f"a task of {spec.chunk} draws is {heaviest:,} backtests; at most {limits.max_task_backtests:,} per task "
            "(ALPHAFORGE_MAX_VALIDATION_TASK_BACKTESTS): use a smaller chunk",
        )
    return tasks


@dataclass(frozen=True)
class Submitted:
    job: Job
    run: BacktestRun
    created: bool  # False: the owner already had a run of this exact config, returned as it is


def find_run(session: Session, owner_id: str, config_hash: str) -> tuple[Job, BacktestRun] | None:
    run = session.scalar(
        select(BacktestRun).where(BacktestRun.owner_id == owner_id, BacktestRun.config_hash == config_hash)
    )
    if run is None:
        return None
    job = session.get(Job, run.job_id)
    assert job is not None
    return job, run


def get_run(session: Session, job_id: uuid.UUID) -> tuple[Job, BacktestRun]:
    run = session.get(BacktestRun, job_id)
    job = session.get(Job, job_id) if run is not None else None
    if run is None or job is None:
        raise NotFound(f"run {job_id} not found", details={"run_id": str(job_id)})
    return job, run


_SYMBOLS_WITH_BARS = text(
    """
    SELECT s FROM unnest(CAST(:symbols AS varchar[])) AS s
    WHERE EXISTS (
        SELECT 1 FROM daily_bars b
        WHERE b.symbol = s
          AND (CAST(:start AS date) IS NULL OR b.date >= CAST(:start AS date))
          AND (CAST(:end AS date) IS NULL OR b.date <= CAST(:end AS date))
    )
    """
)


def check_symbols(session: Session, config: BacktestConfig) -> None:
    """Unknown symbols are a 422 naming each one (``symbols[i]``); a date range in which none of the symbols
    has a bar is a 422 on ``start_date``. A symbol without bars in the range while others have some is that
    symbol's ``NoData`` error in the results (a universe often holds a symbol listed later)."""
    known = set(session.scalars(select(Symbol.symbol).where(Symbol.symbol.in_(config.symbols))))
    unknown = [(i, s) for i, s in enumerate(config.symbols) if s not in known]
    if unknown:
        errors = [{"field": f"symbols[{i}]", "message": f"unknown symbol {s}"} for i, s in unknown]
        shown = ", ".join(s for _, s in unknown[:5]) + (f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else "")
        raise ValidationFailed(f"symbols: unknown symbol(s) {shown}", details={"errors": errors})
    params = {"symbols": config.symbols, "start": config.start_date, "end": config.end_date}
    if session.execute(_SYMBOLS_WITH_BARS, params).first() is None:
        start = config.start_date.isoformat() if config.start_date else "the first bar"
        end = config.end_date.isoformat() if config.end_date else "the last bar"
        message = f"no bars between {start} and {end} for any of the {len(config.symbols)} symbols"
        raise ValidationFailed(
            f"start_date: {message}", details={"errors": [{"field": "start_date", "message": message}]}
        )


def submit_run(
    factory: sessionmaker[Session],
    request: RunRequest,
    *,
    shard_size: int,
    enqueue: jobs.Enqueue,
    max_active_per_owner: int | None = None,
    on_write: jobs.OnWrite | None = None,
    events: JobEvents | None = None,
    validation_limits: ValidationLimits | None = None,
) -> Submitted:
    """The owner's existing run of this config, or a new one written and enqueued through ``jobs.submit``.

    The run row is written in the job's own transaction; two concurrent submissions of one config meet at the
    unique ``(owner_id, config_hash)`` constraint, and the loser returns the winner's run.
    """
    config = request.config
    definition, run_hash = request.definition
    spec = request.validation if request.validation is not None and request.validation.methods() else None
    tasks: list[val.Task] = []
    if spec is not None:
        limits = validation_limits or ValidationLimits(10**12, 10**12)
        tasks = check_validation(config, spec, limits)
    with factory() as session:
        found = find_run(session, request.owner_id, run_hash)
        if found is not None:
            return Submitted(found[0], found[1], created=False)
        check_symbols(session, config)
    job = Job(
        kind=JobKind.BACKTEST.value,
        owner_id=request.owner_id,
        column_name=f"backtest:{config.strategy.name}",
        script=definition,  # the exact thing that runs (config, and validation if any), as a calculation's script
        script_sha256=run_hash,
        symbols=list(config.symbols),
        symbols_sha256=symbols_sha256(config.symbols),
        start_date=config.start_date,
        end_date=config.end_date,
        params=config.strategy.params.model_dump(mode="json"),
        callback_url=request.callback_url,
        callback_state="pending" if request.callback_url else None,
    )
    run = BacktestRun(
        owner_id=request.owner_id,
        name=request.name,
        strategy=config.strategy.name,
        config=config.model_dump(mode="json"),
        config_hash=run_hash,
        validation=spec.model_dump(mode="json") if spec is not None else None,
        strategy_code=request.strategy_code,
    )
    if (config.strategy.name == "script") != (request.strategy_code is not None):
        raise ValueError("a script strategy's run needs its pinned code (and only such a run has one)")

    def write_run(session: Session, written: Job) -> None:
        run.job_id = written.id
        session.add(run)
        session.flush()
        if on_write is not None:
            on_write(session, written)

    try:
        jobs.submit(
            factory, job, shard_size, enqueue, max_active_per_owner=max_active_per_owner, on_write=write_run,
            events=events, tasks_first=[t.as_dict() for t in tasks],
        )  # fmt: skip
    except sqlalchemy.exc.IntegrityError:
        with factory() as session:
            found = find_run(session, request.owner_id, run_hash)
            if found is None:
                raise
            session.expunge_all()
            return Submitted(found[0], found[1], created=False)
    return Submitted(job, run, created=True)


def run_config(session: Session, job_id: uuid.UUID) -> BacktestConfig:
    run = session.get(BacktestRun, job_id)
    if run is None:
        raise NotFound(f"run {job_id} not found", details={"run_id": str(job_id)})
    return BacktestConfig.model_validate(run.config)


def run_validation_spec(session: Session, job_id: uuid.UUID) -> val.ValidationSpec | None:
    raw = session.scalar(select(BacktestRun.validation).where(BacktestRun.job_id == job_id))
    return val.ValidationSpec.model_validate(raw) if raw is not None else None


def engine_bars(bars: SymbolBars) -> Bars:
    """The database's bars as the engine takes them."""
    return Bars.from_arrays(
        open=bars.open, high=bars.high, low=bars.low, close=bars.close, volume=bars.volume, dates=bars.dates
    )


def _finite(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _error(kind: str, message: str) -> dict[str, Any]:
    return {"type": kind, "message": message, "line": None}


@dataclass(frozen=True)
class Curve:
    dates: NDArray[np.datetime64]  # datetime64[D]
    equity: NDArray[np.float64]
    benchmark: NDArray[np.float64]  # the same cash in buy and hold from the first tradable bar
    trades: list[dict[str, Any]]


@dataclass(frozen=True)
class StoredCurve:
    """A symbol's curve as read back (``load_curves``)."""

    symbol: str
    dates: NDArray[np.datetime64]
    equity: NDArray[np.float64]
    benchmark: NDArray[np.float64] | None
    trades: list[dict[str, Any]]


_DAYS = np.dtype(">i4")  # days since 1970-01-01
_VALUES = np.dtype(">f8")


def pack_curve(curve: Curve) -> dict[str, Any]:
    """A curve's columns as stored: fixed-width big-endian bytes (exact, and ~15x cheaper to write than arrays)."""
    return {
        "dates": curve.dates.astype("datetime64[D]").astype(np.int64).astype(_DAYS).tobytes(),
        "equity": np.asarray(curve.equity, dtype=np.float64).astype(_VALUES).tobytes(),
        "benchmark": np.asarray(curve.benchmark, dtype=np.float64).astype(_VALUES).tobytes(),
        "trades": curve.trades,
    }


def unpack_dates(raw: bytes) -> NDArray[np.datetime64]:
    return np.frombuffer(raw, dtype=_DAYS).astype(np.int64).astype("datetime64[D]")


def unpack_values(raw: bytes) -> NDArray[np.float64]:
    return np.frombuffer(raw, dtype=_VALUES).astype(np.float64)


def load_curves(session: Session, job_id: uuid.UUID, *, with_trades: bool = True) -> list[StoredCurve]:
    """A run's stored curves, ordered by symbol (what artifacts and portfolio metrics read)."""
    columns = [BacktestCurve.symbol, BacktestCurve.dates, BacktestCurve.equity, BacktestCurve.benchmark]
    if with_trades:
        columns.append(BacktestCurve.trades)
    rows = session.execute(select(*columns).where(BacktestCurve.job_id == job_id).order_by(BacktestCurve.symbol))
    return [
        StoredCurve(
            row[0], unpack_dates(row[1]), unpack_values(row[2]), unpack_values(row[3]) if row[3] is not None else None,
            list(row[4]) if with_trades else [],
        )
        for row in rows
    ]  # fmt: skip


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
    metrics = {key: _finite(value) for key, value in result.metrics.items()}
    value = metrics.get("Return [%]")
    data = {"metrics": metrics, "orders": result.orders, "warmup_bars": result.warmup}
    outcome = jobs.Outcome(
        symbol, float(value) if isinstance(value, (int, float)) else None, None, incidents, data=data
    )
    first = max(0, min(result.warmup, len(cut) - 1))
    held = config.initial_cash * cut.close / cut.close[first]
    benchmark = np.where(np.arange(len(cut)) < first, config.initial_cash, held)
    trades = [{k: _finite(v) for k, v in t.items()} for t in result.trades.to_records()]
    curve = Curve(result.dates.astype("datetime64[D]"), result.equity, benchmark.astype(np.float64), trades)
    return SymbolRun(outcome, curve)


def job_of_shard(factory: sessionmaker[Session], shard_id: int) -> uuid.UUID | None:
    with factory() as session:
        return session.scalar(select(JobShard.job_id).where(JobShard.id == shard_id))


def has_running_shard(factory: sessionmaker[Session], job_id: uuid.UUID) -> bool:
    with factory() as session:
        return (
            session.scalar(
                select(JobShard.id)
                .where(JobShard.job_id == job_id, JobShard.status == ShardStatus.RUNNING.value)
                .limit(1)
            )
            is not None
        )


def job_is_active(factory: sessionmaker[Session], job_id: uuid.UUID) -> bool:
    with factory() as session:
        status = session.scalar(select(Job.status).where(Job.id == job_id))
    return status in (JobStatus.QUEUED.value, JobStatus.RUNNING.value)


def _store_curves(factory: sessionmaker[Session], job_id: uuid.UUID, runs: Sequence[SymbolRun]) -> None:
    rows = [{"job_id": job_id, "symbol": r.outcome.symbol, **pack_curve(r.curve)} for r in runs if r.curve is not None]
    if not rows:
        return
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
) -> bool:
    job = started.job
    with factory() as session:
        code = session.scalar(select(BacktestRun.strategy_code).where(BacktestRun.job_id == job.id))
        bars = load_bars(session.connection(), started.symbols, config.start_date, config.end_date)
    if code is None:
        raise RuntimeError(f"run {job.id} has a script strategy but no code")
    done = script_symbol_runs(started.symbols, bars, config, code, limits)
    # Recorded before the results, in a transaction of their own, as a calculation shard does.
    record(factory, [(r.outcome.symbol, i) for r in done for i in r.outcome.incidents], job_id=job.id,
           owner_id=job.owner_id)  # fmt: skip
    _store_curves(factory, job.id, done)
    return jobs.complete_shard(factory, started.shard_id, [r.outcome for r in done], events=events)


def run_shard(
    factory: sessionmaker[Session],
    shard_id: int,
    *,
    events: JobEvents | None = None,
    limits: SandboxLimits | None = None,
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
        return run_script_strategy(factory, started, config, limits or SandboxLimits(), events)
    with factory() as session:
        bars = load_bars(session.connection(), started.symbols, config.start_date, config.end_date)
    done: list[SymbolRun] = []
    last_check = time.monotonic()
    for symbol in started.symbols:
        if time.monotonic() - last_check >= CANCEL_CHECK_INTERVAL_S:
            last_check = time.monotonic()
            if not job_is_active(factory, job.id):
                log.info("backtest shard %s: run %s no longer active, stopping after %s symbols", shard_id,
                         job.id, len(done))  # fmt: skip
                break
        done.append(backtest_symbol(symbol, bars.get(symbol), config))
    _store_curves(factory, job.id, done)
    return jobs.complete_shard(factory, shard_id, [r.outcome for r in done], events=events)


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
        loaded = load_bars(session.connection(), wanted, config.start_date, config.end_date)
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
    return jobs.complete_shard(factory, started.shard_id, [], events=events)


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


def load_parts(session: Session, job_id: uuid.UUID) -> list[val.Part]:
    rows = session.execute(
        select(RunValidationPart.method, RunValidationPart.task_index, RunValidationPart.draws,
               RunValidationPart.detail).where(RunValidationPart.job_id == job_id)
    ).all()  # fmt: skip
    return [val.Part(m, k, np.frombuffer(d, dtype="<f8").astype(np.float64), detail) for m, k, d, detail in rows]


@dataclass(frozen=True)
class ValidationProgress:
    tasks_total: int
    tasks_done: int  # finished: succeeded or failed
    tasks_failed: int
    work_total: int  # in backtests (Task.work)
    work_done: int


def validation_progress(session: Session, job_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, ValidationProgress]:
    """Per run with validation: how many of its tasks (and how much of their work) have finished."""
    rows = session.execute(
        select(JobShard.job_id, JobShard.task, JobShard.status).where(
            JobShard.job_id.in_(list(job_ids)), JobShard.task.is_not(None)
        )
    ).all()
    acc: dict[uuid.UUID, list[int]] = {}
    finished = (ShardStatus.SUCCEEDED.value, ShardStatus.FAILED.value)
    for job_id, task, status in rows:
        totals = acc.setdefault(job_id, [0, 0, 0, 0, 0])
        work = int(task.get("work", 0))
        totals[0] += 1
        totals[3] += work
        if status in finished:
            totals[1] += 1
            totals[4] += work
        totals[2] += status == ShardStatus.FAILED.value
    return {job_id: ValidationProgress(*t) for job_id, t in acc.items()}


def ensure_validation(factory: sessionmaker[Session], job: Job, run: BacktestRun) -> dict[str, Any] | None:
    """The run's validation result once it is final: its tasks' parts combined (in task order), plus each
    method's failed tasks and their reasons. Kept once no task is still open (a cancelled run's running tasks
    store what they drew at their checkpoint); None while the run is active or without validation."""
    if run.validation is None:
        return None
    if run.validation_result is not None:
        return run.validation_result
    if job.status not in FINAL_STATUSES:
        return None
    spec = val.ValidationSpec.model_validate(run.validation)
    config = BacktestConfig.model_validate(run.config)
    with factory() as session:
        shards = session.execute(
            select(JobShard.task, JobShard.status, JobShard.error).where(
                JobShard.job_id == job.id, JobShard.task.is_not(None)
            )
        ).all()
        parts = load_parts(session, job.id)
    planned = [val.Task.from_dict(task) for task, _, _ in shards]
    result = val.combine(spec, config.seed, planned, parts)
    for method, block in result["methods"].items():
        failed = [(t, e) for t, status, e in shards if t["method"] == method and status == ShardStatus.FAILED.value]
        block["tasks_failed"] = len(failed)
        block["errors"] = [{"task_index": t["task_index"], "error": e} for t, e in failed[:10]]
    if any(status in (ShardStatus.QUEUED.value, ShardStatus.RUNNING.value) for _, status, _ in shards):
        return result  # not kept: a task may still store its draws
    with session_scope(factory) as session:
        session.execute(
            update(BacktestRun)
            .where(BacktestRun.job_id == job.id, BacktestRun.validation_result.is_(None))
            .values(validation_result=result)
        )
    return result


# --- portfolio ------------------------------------------------------------------------------------------------

TRADING_DAYS = 252


as_days = val.as_days
portfolio_curve = val.portfolio_curve  # the sleeves' arithmetic, shared with validation (shared.domain.robustness)


def portfolio_metrics(curves: val.Curves, initial_cash: float, risk_free_rate: float = 0.0) -> dict[str, Any] | None:
    """Metrics of the run as one portfolio: each symbol a sleeve given ``initial_cash``, equal cash, never
    rebalanced. A sleeve holds its cash before its first bar and its last equity after its last bar; the
    portfolio's equity on each date of the union of dates is the sum of the sleeves'.

    Returns None without curves. Sharpe and volatility use daily returns annualised with 252 periods.
    """
    if not curves:
        return None
    all_dates, total = portfolio_curve(curves, initial_cash)
    start_equity = initial_cash * len(curves)
    final_equity = float(total[-1])
    series = np.concatenate([[start_equity], total])
    returns = series[1:] / series[:-1] - 1
    excess = returns - risk_free_rate / TRADING_DAYS
    std = float(np.std(excess, ddof=1)) if len(excess) > 1 else math.nan
    sharpe = float(np.mean(excess)) / std * math.sqrt(TRADING_DAYS) if std and math.isfinite(std) else math.nan
    peak = np.maximum.accumulate(series)
    max_drawdown = float(np.min(series / peak - 1))
    days = int((all_dates[-1] - all_dates[0]).astype(np.int64))
    growth = final_equity / start_equity
    annual = growth ** (365.25 / days) - 1 if days > 0 and growth > 0 else math.nan
    metrics = {
        "sleeves": len(curves),
        "start": str(all_dates[0]),
        "end": str(all_dates[-1]),
        "initial_equity": start_equity,
        "final_equity": final_equity,
        "return_pct": (growth - 1) * 100,
        "return_ann_pct": annual * 100,
        "volatility_ann_pct": std * math.sqrt(TRADING_DAYS) * 100,
        "sharpe": sharpe,
        "max_drawdown_pct": max_drawdown * 100,
    }
    return {k: _finite(float(v)) if isinstance(v, float) else v for k, v in metrics.items()}


def ensure_portfolio(factory: sessionmaker[Session], job: Job, run: BacktestRun) -> dict[str, Any] | None:
    """Portfolio metrics of a finished run of several symbols: computed from its curves on first read, then
    kept. None while the run is active, or for a one-symbol run (its metrics are the symbol's)."""
    if run.portfolio is not None:
        return run.portfolio
    if job.status not in FINAL_STATUSES or len(job.symbols) < 2:
        return None
    config = BacktestConfig.model_validate(run.config)
    with factory() as session:
        curves = load_curves(session, job.id, with_trades=False)
    portfolio = portfolio_metrics([(c.dates, c.equity) for c in curves], config.initial_cash, config.risk_free_rate)
    if portfolio is None:
        return None
    with session_scope(factory) as session:
        session.execute(
            update(BacktestRun)
            .where(BacktestRun.job_id == job.id, BacktestRun.portfolio.is_(None))
            .values(portfolio=portfolio)
        )
    return portfolio
