"""Job and shard mechanics shared by every kind of job: submit, start, complete, finalize, read.

Completion is counted in PostgreSQL (no chords): each shard is marked done by a conditional
update, in the same transaction that stores its results and bumps the job's counters; the
transaction that completes the last shard also finalizes the job (its final status and, for a kind
that has one, its :data:`Finalize` hook's rows). A duplicate delivery finds its shard already done
and changes nothing.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Generic, TypeVar

import sqlalchemy.exc
from sqlalchemy import func, select, text, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session, sessionmaker

from shared.errors import NotFound, QuotaExceeded, ServiceUnavailable
from shared.infra import events as job_events
from shared.infra import pagination
from shared.infra.config import QUEUE_INTERACTIVE
from shared.infra.db import session_scope
from shared.infra.events import JobEvents
from shared.infra.models import Job, JobResult, JobShard, JobStatus, ShardStatus
from shared.infra.security import Incident
from shared.jobs import leases

log = logging.getLogger(__name__)

R = TypeVar("R")  # a job kind's own record (a run, an optimisation), written with its job

_ACTIVE_JOB = (JobStatus.QUEUED.value, JobStatus.RUNNING.value)
_OPEN_SHARD = (ShardStatus.QUEUED.value, ShardStatus.RUNNING.value)
FINAL_STATUSES = frozenset(
    {JobStatus.SUCCEEDED.value, JobStatus.PARTIAL.value, JobStatus.FAILED.value, JobStatus.CANCELLED.value}
)


@dataclass(frozen=True)
class ShardTask:
    """What gets enqueued: ids only, never payloads."""

    shard_id: int
    task_id: str
    owner_load: int = 0  # the owner's other active jobs on the job's queue at submission (shared/jobs/fairness.py)


Enqueue = Callable[[Sequence[ShardTask]], None]

OnWrite = Callable[[Session, Job], None]
"""Called inside the transaction that writes a job change (to add its audit row, say): both commit together."""

Finalize = Callable[[Session, Job], None]
"""A job kind's finalization: what is computed once a job has ended, from the rows its shards stored, and stored for
its views to read (a backtest run's portfolio and validation result, an optimisation's outcome). Its contract:

* **When**: once per job, when the job has a final status (:data:`FINAL_STATUSES`) and none of its shards is open
  (queued or running). Always in a worker, never in the API: in the transaction of the shard that completes the
  job (``complete_shard`` / ``fail_shard`` with ``finalize=``; the final status and the hook's rows commit
  together, so nobody reads the final status without them), in the one that closes the last open shard of a job
  cancelled while shards ran, or in :func:`finalize_job` (a worker task sent after a cancel that left no shard
  running, and the reconciler's finalize pass, which catches up on any ended job not finalized).
* **Arguments**: the transaction's session (the job's row is locked ``FOR UPDATE``) and the job, freshly loaded:
  final status, counters, ``finished_at`` as they will commit.
* **Duties**: write with the session, never commit or roll back, nothing outside the database (artifacts, webhooks,
  broker messages are for after the commit). Deterministic from the stored rows: a rolled-back call (a worker killed
  mid-transaction) is simply made again by the shard's retry or the reconciler.
* **Failure**: a database outage propagates (the whole transaction rolls back, the shard is retried). Any other
  exception is rolled back to a savepoint and logged; the job still ends, ``jobs.finalize_error`` records why, and
  nothing retries it on its own (a bug: fix it, then clear the error for the reconciler to finalize the job).
* **Done**: ``jobs.finalized_at`` is set in the same transaction. A shard finished without ``finalize`` (None: the
  caller has none) leaves the job unfinalized; for a kind listed with a hook, the reconciler's pass finalizes it.
"""


@dataclass(frozen=True)
class Outcome:
    """One symbol's result: a value (or None), or an error dict ``{type, message, line}``; plus what the
    sandbox rejected while computing it (even when the script caught the refusal and went on)."""

    symbol: str
    value: float | None
    error: dict[str, Any] | None
    incidents: tuple[Incident, ...] = field(default=(), compare=False)
    data: dict[str, Any] | None = None  # what a job kind keeps beside the value (a backtest: its metrics)
    data_version: int | None = None  # of the bars it was computed from (None: it read none)


def read_at(outcomes: Sequence[Outcome], versions: Mapping[str, int]) -> list[Outcome]:
    """The outcomes, each with the data version of its symbol's bars (what its result row records)."""
    return [replace(o, data_version=versions[o.symbol]) if o.symbol in versions else o for o in outcomes]


def split_into_shards(symbols: Sequence[str], shard_size: int) -> list[list[str]]:
    return [list(symbols[i : i + shard_size]) for i in range(0, len(symbols), shard_size)]


def check_active_job_quota(session: Session, owner_id: str, max_active: int) -> None:
    """QuotaExceeded when the owner already has ``max_active`` queued or running jobs.

    A transaction-scoped advisory lock per owner serializes concurrent submissions of one user, so two
    requests cannot both see room for one more job.
    """
    session.execute(select(func.pg_advisory_xact_lock(func.hashtextextended("jobs-of:" + owner_id, 0))))
    active = session.scalar(
        select(func.count()).select_from(Job).where(Job.owner_id == owner_id, Job.status.in_(_ACTIVE_JOB))
    )
    if (active or 0) >= max_active:
        raise QuotaExceeded(
            f"you have {active} jobs queued or running; at most {max_active} at a time: "
            "wait for one to finish or cancel one",
            retry_after_s=ACTIVE_JOBS_RETRY_AFTER_S,
            details={"active_jobs": active, "max_active_jobs": max_active},
        )


ACTIVE_JOBS_RETRY_AFTER_S = 5


def _owner_load(session: Session, job: Job) -> int:
    """The owner's other active jobs on the job's queue: how far down its shards go (shared/jobs/fairness.py)."""
    queue = job.queue or QUEUE_INTERACTIVE
    return int(
        session.scalar(
            select(func.count())
            .select_from(Job)
            .where(Job.owner_id == job.owner_id, Job.status.in_(_ACTIVE_JOB), Job.queue == queue)
        )
        or 0
    )


def submit(
    factory: sessionmaker[Session],
    job: Job,
    shard_size: int,
    enqueue: Enqueue,
    *,
    max_active_per_owner: int | None = None,
    on_write: OnWrite | None = None,
    events: JobEvents | None = None,
    tasks_first: Sequence[dict[str, Any]] = (),
    shard_symbols: bool = True,
) -> Job:
    """Write the job and its shards in one transaction, commit, then enqueue one task per shard.

    ``tasks_first``: shards that carry a task description instead of symbols (a backtest run's validation
    tasks, ``JobShard.task``); they come first (the heaviest work starts first) and count in ``shards_total``
    like any shard, so progress, cancel, retries, the reconciler and finalization treat them alike.

    If enqueueing fails the job is marked failed (never left looking queued) and
    ServiceUnavailable is raised; shards already sent find a failed job and do nothing.
    With ``max_active_per_owner``, an owner at that many active jobs gets QuotaExceeded and nothing is written.
    ``shard_symbols=False``: only the task shards; the job's symbols are what every task works on (an
    optimisation's slices), not split into shards of their own.
    """
    batches = split_into_shards(job.symbols, shard_size) if shard_symbols else []
    job.shard_size = shard_size
    job.shards_total = len(tasks_first) + len(batches)
    job.symbols_total = len(job.symbols)
    job.status = JobStatus.QUEUED.value
    with session_scope(factory) as session:
        if max_active_per_owner is not None and job.owner_id is not None:
            check_active_job_quota(session, job.owner_id, max_active_per_owner)
        owner_load = _owner_load(session, job) if job.owner_id is not None else 0
        session.add(job)
        session.flush()
        shards = [
            JobShard(job_id=job.id, index=i, symbols=[], task=dict(task), status=ShardStatus.QUEUED.value,
                     task_id=str(uuid.uuid4()))
            for i, task in enumerate(tasks_first)
        ] + [
            JobShard(job_id=job.id, index=len(tasks_first) + i, symbols=batch, status=ShardStatus.QUEUED.value,
                     task_id=str(uuid.uuid4()))
            for i, batch in enumerate(batches)
        ]  # fmt: skip
        session.add_all(shards)
        session.flush()
        if on_write is not None:
            on_write(session, job)
        tasks = [ShardTask(shard.id, shard.task_id, owner_load) for shard in shards]
    if events is not None:  # before the tasks exist: a shard's first event can never precede it
        events.publish(
            job.id, job_events.QUEUED, {"kind": job.kind, "shards": job.shards_total, "symbols": len(job.symbols)}
        )
    try:
        enqueue(tasks)
    except Exception as exc:
        log.exception("enqueue failed for job %s", job.id)
        reason = f"the job could not be queued: {type(exc).__name__}: {exc}"
        with session_scope(factory) as session:
            session.execute(
                update(Job)
                .where(Job.id == job.id, Job.status.in_(_ACTIVE_JOB))
                .values(status=JobStatus.FAILED.value, error=reason, finished_at=text("now()"))
            )
            session.execute(
                update(JobShard)
                .where(JobShard.job_id == job.id, JobShard.status.in_(_OPEN_SHARD))
                .values(status=ShardStatus.FAILED.value, error=reason, finished_at=text("now()"))
            )
        if events is not None:
            events.publish(job.id, job_events.FAILED, {"status": JobStatus.FAILED.value, "error": reason})
        raise ServiceUnavailable(
            "the job could not be queued (broker unavailable); nothing will run, please retry",
            details={"job_id": str(job.id)},
        ) from exc
    return job


@dataclass(frozen=True)
class Submitted(Generic[R]):
    """What an idempotent submission returns: the job, its kind's record and whether this call created them."""

    job: Job
    record: R
    created: bool  # False: the owner already had this exact job (same definition hash), returned as it is


def submit_once(
    factory: sessionmaker[Session],
    find: Callable[[Session], tuple[Job, R] | None],
    build: Callable[[Session], tuple[Job, R]],
    shard_size: int,
    enqueue: Enqueue,
    *,
    on_write: OnWrite | None = None,
    **submit_options: Any,
) -> Submitted[R]:
    """The one submit skeleton of every job kind that has a record of its own (a run, an optimisation).

    ``find`` looks up the owner's job of the same definition (by its hash); when there is none, ``build`` (given the
    session, for checks that read rows) makes the job and its record, and both are written in one transaction
    (``record.job_id`` set there) with the shards, then enqueued (``submit``). Two concurrent submissions of one
    definition meet at the record's unique index: the loser's transaction rolls back and it returns the winner's.
    """
    with factory() as session:
        found = find(session)
        if found is not None:
            session.expunge_all()
            return Submitted(found[0], found[1], created=False)
        job, record = build(session)

    def write(session: Session, written: Job) -> None:
        record.job_id = written.id  # type: ignore[attr-defined]
        session.add(record)
        session.flush()
        if on_write is not None:
            on_write(session, written)

    try:
        submit(factory, job, shard_size, enqueue, on_write=write, **submit_options)
    except sqlalchemy.exc.IntegrityError:
        with factory() as session:
            found = find(session)
            if found is None:
                raise
            session.expunge_all()
            return Submitted(found[0], found[1], created=False)
    return Submitted(job, record, created=True)


@dataclass(frozen=True)
class StartedShard:
    shard_id: int
    job: Job
    symbols: list[str]
    task: dict[str, Any] | None = None  # a validation task's description (JobShard.task) instead of symbols


def _lock_job_of_shard(session: Session, shard_id: int) -> uuid.UUID | None:
    """Lock the shard's job row first: every writer takes job, then shard, so none can deadlock."""
    job_id = session.scalar(select(JobShard.job_id).where(JobShard.id == shard_id))
    if job_id is not None:
        session.execute(select(Job.id).where(Job.id == job_id).with_for_update())
    return job_id


def task_event_keys(task: dict[str, Any]) -> dict[str, Any]:
    """How a shard event names the task a task shard runs: always under ``task``; a run's validation task also
    under ``validation`` (what run clients read). An optimisation slice (``kind`` ``optimization``) is no
    validation."""
    keys: dict[str, Any] = {"task": task}
    if task.get("kind") != "optimization":
        keys["validation"] = task
    return keys


def start_shard(
    factory: sessionmaker[Session], shard_id: int, *, events: JobEvents | None = None
) -> StartedShard | None:
    """Claim a shard for running; None when it is finished, cancelled or its job is no longer active."""
    started = _claim_shard(factory, shard_id)
    if started is not None and events is not None:
        shard, index, attempt = started
        detail: dict[str, Any] = {"shard": index, "symbols": len(shard.symbols), "attempt": attempt}
        if shard.task is not None:
            detail.update(task_event_keys(shard.task))
        events.publish(shard.job.id, job_events.SHARD_STARTED, detail)
    return started[0] if started is not None else None


def _claim_shard(factory: sessionmaker[Session], shard_id: int) -> tuple[StartedShard, int, int] | None:
    """Mark the shard running (one more attempt) and, inside a lease heartbeat (shared/jobs/leases.py), take its lease
    in the same update: a shard is never running without saying who holds it. Outside one, the lease is NULL."""
    terms = leases.current_terms()
    with session_scope(factory) as session:
        if _lock_job_of_shard(session, shard_id) is None:
            return None
        row = session.execute(
            text(
                """
                UPDATE job_shards s
                SET status = 'running', attempts = s.attempts + 1, started_at = coalesce(s.started_at, now()),
                    lease_holder = :holder, lease_expires_at = now() + make_interval(secs => :lease_s)
                FROM jobs j
                WHERE s.id = :id AND j.id = s.job_id
                  AND s.status IN ('queued', 'running') AND j.status IN ('queued', 'running')
                RETURNING s.job_id, s.symbols, s.index, s.attempts, s.task
                """
            ),
            {"id": shard_id, "holder": terms.holder if terms else None, "lease_s": terms.lease_s if terms else None},
        ).first()
        if row is None:
            return None
        job_id, symbols, index, attempts, task = row
        session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == JobStatus.QUEUED.value)
            .values(status=JobStatus.RUNNING.value, started_at=text("now()"))
        )
        job = session.get(Job, job_id)
        assert job is not None
        return StartedShard(shard_id, job, list(symbols), task), index, attempts


@dataclass(frozen=True)
class _ShardEnd:
    """What finishing a shard changed: its lifecycle events once the transaction has committed."""

    job_id: uuid.UUID
    shard: dict[str, Any]  # the shard_finished event
    final: str | None  # the job's final status when this shard completed it


def _publish_end(events: JobEvents | None, end: _ShardEnd | None) -> None:
    if events is None or end is None:
        return
    events.publish(end.job_id, job_events.SHARD_FINISHED, end.shard)
    if end.final is not None:
        counters = {k: v for k, v in end.shard.items() if k.startswith(("shards_", "symbols_"))}
        events.publish(end.job_id, job_events.terminal_kind(end.final), {"status": end.final, **counters})


def _is_outage(exc: BaseException) -> bool:
    return isinstance(exc, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError))


def finalize_locked(session: Session, job_id: uuid.UUID, finalize: Finalize | None) -> bool:
    """Run the job kind's finalization (:data:`Finalize`) in this transaction, whose caller holds the job's row lock,
    if the job has ended with no shard open and is not finalized yet. True when it finalized the job now."""
    job = session.get(Job, job_id, populate_existing=True)
    if finalize is None or job is None or job.status not in FINAL_STATUSES or job.finalized_at is not None:
        return False
    open_shard = session.scalar(
        select(JobShard.id).where(JobShard.job_id == job_id, JobShard.status.in_(_OPEN_SHARD)).limit(1)
    )
    if open_shard is not None:
        return False  # the shard that closes last finalizes
    try:
        with session.begin_nested():
            finalize(session, job)
    except Exception as exc:
        if _is_outage(exc):
            raise
        log.exception("job %s: its finalization failed; the job ends without it", job_id)
        reason = f"{type(exc).__name__}: {exc}"[:1000]
        session.execute(update(Job).where(Job.id == job_id).values(finalize_error=reason))
        return False
    session.execute(update(Job).where(Job.id == job_id).values(finalized_at=text("now()"), finalize_error=None))
    return True


def finalize_job(factory: sessionmaker[Session], job_id: uuid.UUID, finalize: Finalize | None) -> bool:
    """Finalize a job that ended with no shard left to do it (a cancel while every shard waited; what the
    reconciler catches up on): :func:`finalize_locked` under the job's row lock. Idempotent; a worker calls it."""
    with session_scope(factory) as session:
        if session.execute(select(Job.id).where(Job.id == job_id).with_for_update()).first() is None:
            return False
        return finalize_locked(session, job_id, finalize)


def _finish_shard(
    session: Session,
    shard_id: int,
    status: ShardStatus,
    outcomes: Sequence[Outcome],
    error: str | None,
    finalize: Finalize | None,
) -> _ShardEnd | None:
    if _lock_job_of_shard(session, shard_id) is None:
        return None
    claimed = session.execute(
        update(JobShard)
        .where(JobShard.id == shard_id, JobShard.status.in_(_OPEN_SHARD))
        .values(status=status.value, error=error, finished_at=text("now()"))
        .returning(JobShard.job_id, JobShard.index, JobShard.task)
    ).first()
    if claimed is None:
        return None  # already finished by another delivery: change nothing
    job_id, index, task = claimed
    if outcomes:
        stmt = insert(JobResult).values(
            [
                {
                    "job_id": job_id,
                    "symbol": o.symbol,
                    "value": o.value,
                    "error": o.error,
                    "data": o.data,
                    "data_version": o.data_version,
                }
                for o in outcomes
            ]
        )
        session.execute(
            stmt.on_conflict_do_update(
                index_elements=[JobResult.job_id, JobResult.symbol],
                set_={
                    "value": stmt.excluded.value,
                    "error": stmt.excluded.error,
                    "data": stmt.excluded.data,
                    "data_version": stmt.excluded.data_version,
                    "computed_at": text("now()"),
                },
            )
        )
    failed = sum(1 for o in outcomes if o.error is not None)
    counters = session.execute(
        update(Job)
        .where(Job.id == job_id)
        .values(
            shards_done=Job.shards_done + 1,
            shards_failed=Job.shards_failed + (1 if status is ShardStatus.FAILED else 0),
            symbols_done=Job.symbols_done + len(outcomes),
            symbols_failed=Job.symbols_failed + failed,
            error=func.coalesce(Job.error, error),
        )
        .returning(
            Job.shards_done,
            Job.shards_total,
            Job.shards_failed,
            Job.symbols_done,
            Job.symbols_failed,
            Job.symbols_total,
            Job.status,
        )
    ).one()
    shards_done, shards_total, shards_failed, symbols_done, symbols_failed, symbols_total, job_status = counters
    shard_event = {
        "shard": index,
        "status": status.value,
        "symbols": len(outcomes),
        "failed": failed,
        "shards_done": shards_done,
        "shards_total": shards_total,
        "symbols_done": symbols_done,
        "symbols_failed": symbols_failed,
        "symbols_total": symbols_total,
    }
    if task is not None:
        shard_event.update(task_event_keys(task))
    end = _ShardEnd(job_id, shard_event, None)
    if shards_done >= shards_total:
        if symbols_failed == 0 and shards_failed == 0:  # a failed shard without symbols (a task) is partial
            final = JobStatus.SUCCEEDED
        elif symbols_failed >= symbols_total:
            final = JobStatus.FAILED
        else:
            final = JobStatus.PARTIAL
        finalized = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status.in_(_ACTIVE_JOB))
            .values(status=final.value, finished_at=text("now()"))
        )
        if finalized.rowcount:  # type: ignore[attr-defined]
            end = _ShardEnd(end.job_id, end.shard, final.value)
    if finalize is not None and (end.final is not None or job_status not in _ACTIVE_JOB):
        # The job ends with this shard, or had ended (cancelled) and this may have been its last open shard.
        finalize_locked(session, job_id, finalize)
    return end


def complete_shard(
    factory: sessionmaker[Session],
    shard_id: int,
    outcomes: Sequence[Outcome],
    *,
    events: JobEvents | None = None,
    finalize: Finalize | None = None,
) -> bool:
    """Store results and mark the shard succeeded, atomically (with the job's final status and its ``finalize`` rows
    when this shard ends the job). False if it was already finished."""
    with session_scope(factory) as session:
        end = _finish_shard(session, shard_id, ShardStatus.SUCCEEDED, outcomes, None, finalize)
    _publish_end(events, end)
    return end is not None


def fail_shard(
    factory: sessionmaker[Session],
    shard_id: int,
    reason: str,
    *,
    events: JobEvents | None = None,
    finalize: Finalize | None = None,
) -> bool:
    """Give up on a shard: each of its symbols gets the reason as its error (and the job is finalized with
    ``finalize`` if this ends it, as in :func:`complete_shard`). False if already finished."""
    with session_scope(factory) as session:
        symbols = session.scalar(select(JobShard.symbols).where(JobShard.id == shard_id))
        if symbols is None:
            return False
        outcomes = [Outcome(s, None, {"type": "ShardFailed", "message": reason, "line": None}) for s in symbols]
        end = _finish_shard(session, shard_id, ShardStatus.FAILED, outcomes, reason, finalize)
    _publish_end(events, end)
    return end is not None


def get_job(session: Session, job_id: uuid.UUID) -> Job:
    job = session.get(Job, job_id)
    if job is None:
        raise NotFound(f"job {job_id} not found", details={"job_id": str(job_id)})
    return job


def job_with_record(session: Session, record: type[R], key: Any, *where: Any) -> tuple[Job, R] | None:
    """A job and its kind's record (``key``: the record's job id column), read in one statement and so from one
    snapshot: two reads could pair a job already final with its record as it was before the finalization that
    ended the job committed (a view showing a finished run without its portfolio)."""
    row = session.execute(select(Job, record).join(record, key == Job.id).where(*where)).first()
    return None if row is None else (row[0], row[1])


RESULTS_BY_SYMBOL: pagination.Keyset[JobResult] = pagination.Keyset(
    (JobResult.symbol,), (pagination.text,), lambda r: (r.symbol,)
)


def page_results(
    session: Session, job_id: uuid.UUID, *, limit: int, cursor: str | None
) -> tuple[list[JobResult], str | None]:
    """A job's results ordered by symbol, one page, and the next page's cursor."""
    query = select(JobResult).where(JobResult.job_id == job_id)
    return pagination.page(session, query, RESULTS_BY_SYMBOL, limit=limit, cursor=cursor)


def cancel_job(
    factory: sessionmaker[Session],
    job_id: uuid.UUID,
    *,
    on_write: OnWrite | None = None,
    events: JobEvents | None = None,
) -> tuple[Job, list[str]]:
    """Cancel an active job: its queued shards are cancelled (their task ids returned for revoking);
    running shards finish and keep their results. Cancelling a finished job changes nothing (and calls
    no ``on_write``). The cancel never finalizes (the API calls it): the last running shard does when it stops, or,
    with none running, :func:`finalize_job` in the worker task the caller sends."""
    with session_scope(factory) as session:
        job = session.get(Job, job_id, with_for_update=True)
        if job is None:
            raise NotFound(f"job {job_id} not found", details={"job_id": str(job_id)})
        if job.status not in _ACTIVE_JOB:
            return job, []
        job.status = JobStatus.CANCELLED.value
        job.finished_at = session.scalar(select(text("now()")))
        task_ids = session.scalars(
            update(JobShard)
            .where(JobShard.job_id == job_id, JobShard.status == ShardStatus.QUEUED.value)
            .values(status=ShardStatus.CANCELLED.value, finished_at=text("now()"))
            .returning(JobShard.task_id)
        ).all()
        if on_write is not None:
            on_write(session, job)
    if events is not None:
        detail = {
            "status": JobStatus.CANCELLED.value,
            "shards_revoked": len(task_ids),
            "shards_done": job.shards_done,
            "symbols_done": job.symbols_done,
        }
        events.publish(job.id, job_events.CANCELLED, detail)
    return job, list(task_ids)
