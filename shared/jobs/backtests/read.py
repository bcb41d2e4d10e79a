"""What a backtest run's views and its other stages read: rows only, never the engine.

A view (``GET /api/runs/<id>``, the run's events, its artifacts listing) reads what the workers stored: the job, the
run record with the portfolio and validation result its finalization wrote (:mod:`.finalize`), per-symbol results
and the progress of its validation tasks. The stored curve and validation-part formats are read back here too, for
finalization and artifacts.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from sqlalchemy import cast, func, select
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.types import Text

from shared.domain import robustness as val
from shared.domain.backtest import BacktestConfig
from shared.errors import NotFound
from shared.infra.models import BacktestCurve, BacktestRun, Job, JobShard, JobStatus, RunValidationPart, ShardStatus
from shared.jobs import pipeline as jobs

FINAL_STATUSES = jobs.FINAL_STATUSES

# The per-symbol metrics repeated in a run's summary (the full set is in the run's results).
SUMMARY_METRICS = {
    "return_pct": "Return [%]",
    "buy_and_hold_return_pct": "Buy & Hold Return [%]",
    "sharpe": "Sharpe Ratio",
    "max_drawdown_pct": "Max. Drawdown [%]",
    "trades": "# Trades",
    "win_rate_pct": "Win Rate [%]",
}


def find_run(session: Session, owner_id: str, config_hash: str, data_sha256: str) -> tuple[Job, BacktestRun] | None:
    """The owner's run of this definition on this data."""
    return jobs.job_with_record(
        session,
        BacktestRun,
        BacktestRun.job_id,
        BacktestRun.owner_id == owner_id,
        BacktestRun.config_hash == config_hash,
        BacktestRun.data_sha256 == data_sha256,
    )


def get_run(session: Session, job_id: uuid.UUID) -> tuple[Job, BacktestRun]:
    found = jobs.job_with_record(session, BacktestRun, BacktestRun.job_id, Job.id == job_id)
    if found is None:
        raise NotFound(f"run {job_id} not found", details={"run_id": str(job_id)})
    return found


def run_config(session: Session, job_id: uuid.UUID) -> BacktestConfig:
    run = session.get(BacktestRun, job_id)
    if run is None:
        raise NotFound(f"run {job_id} not found", details={"run_id": str(job_id)})
    return BacktestConfig.model_validate(run.config)


def run_validation_spec(session: Session, job_id: uuid.UUID) -> val.ValidationSpec | None:
    raw = session.scalar(select(BacktestRun.validation).where(BacktestRun.job_id == job_id))
    return val.ValidationSpec.model_validate(raw) if raw is not None else None


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


# --- stored curves ----------------------------------------------------------------------------------------------

_DAYS = np.dtype(">i4")  # days since 1970-01-01 (daily and coarser bars)
_SECONDS = np.dtype(">i8")  # seconds since 1970-01-01 UTC (intraday bars): a curve's width tells them apart
_VALUES = np.dtype(">f8")


@dataclass(frozen=True)
class StoredCurve:
    """A symbol's curve as read back (``load_curves``)."""

    symbol: str
    dates: NDArray[np.datetime64]
    equity: NDArray[np.float64]
    benchmark: NDArray[np.float64] | None
    trades: list[dict[str, Any]]


def pack_dates(dates: NDArray[np.datetime64]) -> bytes:
    """Stored curve columns are fixed-width big-endian bytes (exact, and ~15x cheaper to write than arrays): days
    (4 bytes) for dates, seconds (8 bytes) for the instants of intraday bars."""
    if np.datetime_data(dates.dtype)[0] == "D":
        return dates.astype(np.int64).astype(_DAYS).tobytes()
    return dates.astype("datetime64[s]").astype(np.int64).astype(_SECONDS).tobytes()


def pack_values(values: NDArray[np.float64]) -> bytes:
    return np.asarray(values, dtype=np.float64).astype(_VALUES).tobytes()


def unpack_dates(raw: bytes, n: int) -> NDArray[np.datetime64]:
    """A curve's ``n`` dates (``datetime64[D]``) or instants (``datetime64[s]``), by the width they were stored at."""
    if len(raw) == n * _SECONDS.itemsize and n:
        return np.frombuffer(raw, dtype=_SECONDS).astype(np.int64).astype("datetime64[s]")
    return np.frombuffer(raw, dtype=_DAYS).astype(np.int64).astype("datetime64[D]")


def unpack_values(raw: bytes) -> NDArray[np.float64]:
    return np.frombuffer(raw, dtype=_VALUES).astype(np.float64)


IN_MEMORY_PER_STORED_BYTE = 4
"""What a stored curve byte costs while a batch is read: twice that as the hex text of the bytea (a SELECT's), once
as ``bytes``, then the arrays (int32 days become datetime64)."""

CURVE_BATCH_BYTES = 64 * 2**20 // IN_MEMORY_PER_STORED_BYTE
"""Stored bytes of the curves one statement of a run-wide read fetches (:func:`curve_batches`: a run's finalization
and artifacts): ``ALPHAFORGE_RUN_BATCH_MB`` (:func:`configure`) divided by :data:`IN_MEMORY_PER_STORED_BYTE`."""


def configure(run_batch_mb: int) -> None:
    """This process's bound on what a run-wide read holds at once (``ALPHAFORGE_RUN_BATCH_MB``)."""
    global CURVE_BATCH_BYTES
    CURVE_BATCH_BYTES = max(1, run_batch_mb * 2**20 // IN_MEMORY_PER_STORED_BYTE)


def run_batch_bytes() -> int:
    """``ALPHAFORGE_RUN_BATCH_MB`` in bytes: what sizes a run-wide step's other buffers (equity.csv's rows at once)."""
    return CURVE_BATCH_BYTES * IN_MEMORY_PER_STORED_BYTE


def _batches(plan: Sequence[tuple[str, int]], budget: int) -> Iterator[list[str]]:
    """The planned symbols in order, cut into runs of at most ``budget`` bytes (at least one symbol each)."""
    batch: list[str] = []
    size = 0
    for symbol, cost in plan:
        if batch and size + cost > budget:
            yield batch
            batch, size = [], 0
        batch.append(symbol)
        size += cost
    if batch:
        yield batch


def curve_batches(
    session: Session,
    job_id: uuid.UUID,
    *,
    with_trades: bool = True,
    with_benchmark: bool = True,
    symbol_order: bool = False,
    batch_bytes: int | None = None,
) -> Iterator[list[StoredCurve]]:
    """A run's stored curves, a batch of at most ``batch_bytes`` stored bytes (default :data:`CURVE_BATCH_BYTES`)
    a statement: what a run-wide step holds of them at once, whatever the run's size. In the database's ``ORDER BY
    symbol`` (the order of the portfolio's sums), or with ``symbol_order`` in Python's order of the symbols (the
    artifacts' files)."""
    size = func.octet_length(BacktestCurve.dates) + func.octet_length(BacktestCurve.equity)
    if with_benchmark:
        size = size + func.coalesce(func.octet_length(BacktestCurve.benchmark), 0)
    if with_trades:
        size = size + func.octet_length(cast(BacktestCurve.trades, Text))
    plan = [(s, int(n)) for s, n in session.execute(
        select(BacktestCurve.symbol, size).where(BacktestCurve.job_id == job_id).order_by(BacktestCurve.symbol)
    )]  # fmt: skip
    if symbol_order:
        plan.sort()
    columns: list[Any] = [BacktestCurve.symbol, BacktestCurve.dates, BacktestCurve.equity]
    columns += [BacktestCurve.benchmark] if with_benchmark else []
    columns += [BacktestCurve.trades] if with_trades else []
    for batch in _batches(plan, CURVE_BATCH_BYTES if batch_bytes is None else batch_bytes):
        rows = session.execute(
            select(*columns).where(BacktestCurve.job_id == job_id, BacktestCurve.symbol.in_(batch))
        ).all()
        found = {row[0]: row for row in rows}
        curves = []
        for symbol in batch:
            row = found.pop(symbol, None)
            if row is None:
                continue  # deleted since the plan (retention): not the run's any more
            equity = unpack_values(row[2])
            benchmark = unpack_values(row[3]) if with_benchmark and row[3] is not None else None
            trades = list(row[-1]) if with_trades else []
            curves.append(StoredCurve(symbol, unpack_dates(row[1], len(equity)), equity, benchmark, trades))
        del rows, found
        yield curves


def load_curves(session: Session, job_id: uuid.UUID, *, with_trades: bool = True) -> list[StoredCurve]:
    """A run's stored curves, ordered by symbol, all at once: for a run of a few symbols (a whole run's step reads
    :func:`curve_batches`)."""
    return [c for batch in curve_batches(session, job_id, with_trades=with_trades) for c in batch]


# --- validation ---------------------------------------------------------------------------------------------------


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
