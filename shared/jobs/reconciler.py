"""Self-healing: find shards whose task vanished and publish them again, a bounded number of times.

A shard's task can vanish without any process noticing: the worker holding it is killed (on Redis an
acknowledged-late message then waits in the ``unacked`` set until the visibility timeout, an hour), the broker
restarts without the message, or a message expires. The job would then stay ``running`` forever. The reconciler
(run by Celery beat, see worker/maintenance_tasks.py) takes two kinds of candidates among the open shards of
active jobs:

* a **running shard whose lease has expired** (shared/jobs/leases.py): its holder stopped renewing it (killed, or
  stalled), so it is looked at in the next pass, seconds after the death, with no grace period;
* a **queued shard** (or a running one claimed without a lease) published more than a grace period ago: a message
  can legitimately wait in a queue for a long time, so only these passes scan the queues (less often, see
  ``Maintenance.queued_pass_interval_s``);
* a **queued shard published before a death** that a pass has just seen (a lease expired and its task is found
  nowhere): the dead worker may have prefetched it, and a prefetched message dies with its worker (on Redis it
  waits in ``unacked`` for the visibility timeout). The pass that sees the death judges those at once instead of
  after the grace period; one queue scan per death, none while every worker lives.

It asks where each candidate's current task is (still in a broker queue, or held by a live worker:
:data:`LiveTasks`), and for each one found nowhere:

* re-publishes it under a fresh task id (``requeues`` + 1, ``enqueued_at`` = now), or
* after ``max_requeues`` re-publications, fails the shard with the reason (each of its symbols gets it as its
  error, and the job finalizes like any other), so no job waits forever.

When that cannot be told (no worker answered at all), queued candidates are left for the next pass, but shards
whose lease expired are judged vanished anyway: the silence of the holder is the evidence, and a worker that is
alive but did not answer (or a reconciler run where no worker can answer, a solo pool) must not keep them waiting.

A false "vanished" (a live worker that did not answer in time, a lease that lapsed while PostgreSQL was paused)
costs one duplicate delivery: shards are claimed and finished with conditional updates and results upserted, so
the duplicate changes nothing. That is also why the lease fences nothing: the holder that finishes first stores
its (deterministic) results, whether or not its lease lapsed meanwhile.

A second pass, :func:`finalize_ended`, catches up on ended jobs of a kind with a finalization
(``shared.jobs.pipeline.Finalize``) that nobody finalized: one cancelled while every shard waited whose follow-up task
was lost, one whose last running shard's worker died after the cancel (that shard is closed: nothing may run it any
more), one whose submission failed to enqueue, one ended by a caller that had no hook. It finalizes them here, in
the worker that runs the pass, never in the API.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections import defaultdict
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Engine, Select, and_, func, or_, select, text, update
from sqlalchemy.orm import Session, sessionmaker

from shared.infra.db import session_scope
from shared.infra.models import Job, JobShard, JobStatus, ShardStatus
from shared.jobs import pipeline as jobs

log = logging.getLogger(__name__)

LiveTasks = Callable[[Collection[str]], "set[str] | None"]
"""Given task ids, those still alive somewhere (waiting in a broker queue or held by a live worker); None when
that cannot be told right now (broker unreachable, no worker answered): then nothing is judged vanished."""

Requeue = Callable[[str, str, Sequence[jobs.ShardTask]], None]
"""Publishes shard tasks of one job kind on one queue: ``requeue(kind, queue, tasks)`` (the kind picks the task)."""


@dataclass(frozen=True)
class Candidate:
    """An open shard of an active job: running with an expired lease, or published more than the grace ago."""

    shard_id: int
    job_id: uuid.UUID
    kind: str
    queue: str
    task_id: str
    status: str
    requeues: int
    lease_expired: bool
    lease_expires_at: datetime | None


@dataclass
class ReconcileReport:
    candidates: int = 0
    alive: int = 0
    requeued: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    skipped: str | None = None  # why this pass left (some) candidates unjudged
    failed_jobs: set[tuple[str, uuid.UUID]] = field(default_factory=set)  # (kind, job id) of the failed shards

    def as_dict(self) -> dict[str, object]:
        return {"candidates": self.candidates, "alive": self.alive, "requeued": len(self.requeued),
                "failed": len(self.failed), "skipped": self.skipped}  # fmt: skip


_OPEN = (ShardStatus.QUEUED.value, ShardStatus.RUNNING.value)
_ACTIVE = (JobStatus.QUEUED.value, JobStatus.RUNNING.value)


def _lease_expired() -> ColumnElement[bool]:
    return and_(JobShard.status == ShardStatus.RUNNING.value, JobShard.lease_expires_at < func.now())


def _no_live_lease() -> ColumnElement[bool]:
    """Queued, running without a lease (claimed outside a heartbeat, or before leases existed), or expired."""
    return or_(
        JobShard.status == ShardStatus.QUEUED.value,
        JobShard.lease_expires_at.is_(None),
        JobShard.lease_expires_at < func.now(),
    )


def candidate_query(*, grace_s: float, kinds: Collection[str], limit: int, queued: bool = True) -> Select[Any]:
    """Open shards of active jobs of the given kinds that are running with an expired lease, and (``queued``)
    those (re-)published more than ``grace_s`` seconds ago that hold no live lease; expired leases first.

    With ``queued=False`` (the frequent pass) the query reads only running shards: ``ix_job_shards_status`` finds
    them (no more than the workers run at once, plus the stranded ones), so a pass with nothing to do is one
    cheap index scan (benchmarks/reconciler_pass.py)."""
    expired = _lease_expired()
    wanted = expired
    if queued:
        wanted = or_(expired, _published_before(func.now() - func.make_interval(0, 0, 0, 0, 0, 0, grace_s)))
    return _candidates(wanted, kinds=kinds, limit=limit)


def published_before_query(before: datetime, *, kinds: Collection[str], limit: int) -> Select[Any]:
    """Open shards of active jobs of the given kinds with no live lease, (re-)published before ``before``."""
    return _candidates(_published_before(before), kinds=kinds, limit=limit)


def _published_before(before: Any) -> ColumnElement[bool]:
    return and_(JobShard.status.in_(_OPEN), _no_live_lease(), JobShard.enqueued_at < before)


def _candidates(wanted: ColumnElement[bool], *, kinds: Collection[str], limit: int) -> Select[Any]:
    expired = _lease_expired()
    columns = (JobShard.id, JobShard.job_id, Job.kind, Job.queue, JobShard.task_id, JobShard.status, JobShard.requeues)
    return (
        select(*columns, expired, JobShard.lease_expires_at)
        .join(Job, Job.id == JobShard.job_id)
        .where(wanted, Job.status.in_(_ACTIVE), Job.kind.in_(list(kinds)))
        .order_by(expired.desc(), JobShard.enqueued_at, JobShard.id)
        .limit(limit)
    )


def find_candidates(
    session: Session, *, grace_s: float, kinds: Collection[str], limit: int, queued: bool = True
) -> list[Candidate]:
    return _read(session, candidate_query(grace_s=grace_s, kinds=kinds, limit=limit, queued=queued))


def _read(session: Session, query: Select[Any]) -> list[Candidate]:
    return [Candidate(s, j, k, q, t, st, r, bool(e), x) for s, j, k, q, t, st, r, e, x in session.execute(query)]


def _vanished(
    candidates: Sequence[Candidate], live_tasks: LiveTasks, report: ReconcileReport
) -> tuple[list[Candidate], bool]:
    """The candidates whose task is found nowhere, and whether that could be told (else only those whose lease
    expired are returned: their holder's silence is the evidence)."""
    report.candidates += len(candidates)
    if not candidates:
        return [], True
    alive = live_tasks([c.task_id for c in candidates])
    told = alive is not None
    judged = list(candidates)
    if alive is None:
        judged = [c for c in candidates if c.lease_expired]
        report.skipped = "could not tell which tasks are alive (broker or workers did not answer)"
        log.warning("reconciler: %s; %d shards left for the next pass, %d whose lease expired judged vanished",
                    report.skipped, len(candidates) - len(judged), len(judged))  # fmt: skip
        alive = set()
    vanished = [c for c in judged if c.task_id not in alive]
    report.alive += len(judged) - len(vanished)
    return vanished, told


def gave_up_reason(requeues: int) -> str:
    return (
        f"the shard's task vanished {requeues + 1} times (worker killed, broker restarted or message lost); "
        f"gave up after {requeues} re-enqueues"
    )


def _claim_requeue(session: Session, candidate: Candidate) -> str | None:
    """Give the shard a fresh task id, unless it moved on meanwhile (finished, re-published by someone else, or
    its lease renewed)."""
    new_task_id = str(uuid.uuid4())
    claimed = session.execute(
        update(JobShard)
        .where(
            JobShard.id == candidate.shard_id,
            JobShard.task_id == candidate.task_id,
            JobShard.status.in_(_OPEN),
            _no_live_lease(),  # a heartbeat that renewed meanwhile (the database was paused) keeps its shard
        )
        .values(
            task_id=new_task_id,
            status=ShardStatus.QUEUED.value,
            requeues=JobShard.requeues + 1,
            enqueued_at=text("now()"),
        )
        .returning(JobShard.id)
    ).first()
    return new_task_id if claimed is not None else None


def reconcile(
    factory: sessionmaker[Session],
    *,
    live_tasks: LiveTasks,
    requeue: Requeue,
    kinds: Collection[str],
    grace_s: float,
    max_requeues: int,
    limit: int = 5000,
    queued: bool = True,
    finalizers: Mapping[str, jobs.Finalize] | None = None,
) -> ReconcileReport:
    """One pass: judge the candidates, re-publish or fail the vanished ones. ``queued=False``: only running
    shards whose lease expired (the frequent pass). Safe to run concurrently with workers and with other passes
    (every change is a conditional update); run one pass of each kind at a time (:func:`single_flight`).
    ``finalizers``: each kind's finalization, for a failed shard that ends its job (else :func:`finalize_ended`)."""
    report = ReconcileReport()
    with factory() as session:
        candidates = find_candidates(session, grace_s=grace_s, kinds=kinds, limit=limit, queued=queued)
    vanished, told = _vanished(candidates, live_tasks, report)
    deaths = [c.lease_expires_at for c in vanished if c.lease_expired and c.lease_expires_at is not None]
    if deaths and told:  # a worker died: what it had prefetched is lost with it, whatever the grace says
        seen = {c.shard_id for c in candidates}
        with factory() as session:
            orphans = _read(session, published_before_query(max(deaths), kinds=kinds, limit=limit))
        more, _ = _vanished([c for c in orphans if c.shard_id not in seen], live_tasks, report)
        vanished.extend(more)
    to_publish: dict[tuple[str, str], list[jobs.ShardTask]] = defaultdict(list)
    for candidate in vanished:
        if candidate.requeues >= max_requeues:
            reason = gave_up_reason(candidate.requeues)
            if jobs.fail_shard(factory, candidate.shard_id, reason, finalize=(finalizers or {}).get(candidate.kind)):
                report.failed.append(candidate.shard_id)
                report.failed_jobs.add((candidate.kind, candidate.job_id))
                log.error("reconciler: shard %s of job %s failed: %s", candidate.shard_id, candidate.job_id, reason)
            continue
        with session_scope(factory) as session:
            new_task_id = _claim_requeue(session, candidate)
        if new_task_id is not None:
            to_publish[candidate.kind, candidate.queue].append(jobs.ShardTask(candidate.shard_id, new_task_id))
    for (kind, queue), tasks in to_publish.items():
        requeue(kind, queue, tasks)  # if this fails, the shards wait one grace period and are judged again
        report.requeued.extend(t.shard_id for t in tasks)
        log.warning("reconciler: re-enqueued %d %s shards whose task vanished: %s", len(tasks), kind,
                    [t.shard_id for t in tasks])  # fmt: skip
    return report


@dataclass
class FinalizeReport:
    finalized: list[tuple[str, uuid.UUID]] = field(default_factory=list)  # (kind, job id), finalized by this pass
    shards_closed: int = 0

    def as_dict(self) -> dict[str, object]:
        return {"finalized": len(self.finalized), "shards_closed": self.shards_closed}


LOST_AFTER_END = "closed by the reconciler: its job had ended, and no live worker held it"


def _ended_unfinalized(kinds: Collection[str]) -> tuple[ColumnElement[bool], ...]:
    return (
        Job.kind.in_(list(kinds)),
        Job.finalized_at.is_(None),
        Job.finalize_error.is_(None),
        Job.status.in_(sorted(jobs.FINAL_STATUSES)),
    )


def lost_shard_query(*, kinds: Collection[str], limit: int) -> Select[Any]:
    """Ended jobs of the given kinds, neither finalized nor failed to, with a running shard whose lease expired
    (its worker died after the job ended). Driven by the running shards (``ix_job_shards_status``, few), as the
    frequent reconciler pass."""
    return (
        select(Job.id, Job.kind)
        .join(JobShard, JobShard.job_id == Job.id)
        .where(_lease_expired(), *_ended_unfinalized(kinds))
        .distinct()
        .limit(limit)
    )


def overdue_query(*, kinds: Collection[str], grace_s: float, limit: int) -> Select[Any]:
    """Ended jobs of the given kinds, neither finalized nor failed to, that ended more than ``grace_s`` ago (their
    own path had that long to finalize them): ``ix_jobs_unfinalized`` finds them."""
    ended_before = func.now() - func.make_interval(0, 0, 0, 0, 0, 0, grace_s)
    return (
        select(Job.id, Job.kind)
        .where(*_ended_unfinalized(kinds), Job.finished_at < ended_before)
        .order_by(Job.finished_at)
        .limit(limit)
    )


def close_lost_shards(session: Session, job_id: uuid.UUID) -> int:
    """Close an ended job's open shards that no live lease holds (cancelled: a claim needs an active job, so nothing
    will ever run them). A holder that was only stalled finds its shard closed when it resumes, and stores nothing,
    as a duplicate delivery would."""
    closed = session.execute(
        update(JobShard)
        .where(JobShard.job_id == job_id, JobShard.status.in_(_OPEN), _no_live_lease())
        .values(status=ShardStatus.CANCELLED.value, finished_at=text("now()"),
                error=func.coalesce(JobShard.error, LOST_AFTER_END))
        .returning(JobShard.id)
    ).all()  # fmt: skip
    return len(closed)


def finalize_ended(
    factory: sessionmaker[Session],
    *,
    finalizers: Mapping[str, jobs.Finalize],
    grace_s: float,
    limit: int = 200,
    queued: bool = True,
) -> FinalizeReport:
    """Finalize ended jobs that nobody finalized (:func:`lost_shard_query`; with ``queued``, :func:`overdue_query`
    too), one transaction each under the job's row lock (a job whose lock is held, by the shard finishing it say, is
    left for the next pass): close its lost shards, then run its kind's finalization if nothing is open
    (``pipeline.finalize_locked``)."""
    report = FinalizeReport()
    if not finalizers:
        return report
    kinds = finalizers.keys()
    with factory() as session:
        found = list(session.execute(lost_shard_query(kinds=kinds, limit=limit)).all())
        if queued:
            found.extend(session.execute(overdue_query(kinds=kinds, grace_s=grace_s, limit=limit)).all())
    candidates = list(dict.fromkeys((job_id, kind) for job_id, kind in found))
    for job_id, kind in candidates:
        with session_scope(factory) as session:
            locked = session.execute(select(Job.id).where(Job.id == job_id).with_for_update(skip_locked=True)).first()
            if locked is None:
                continue
            closed = close_lost_shards(session, job_id)
            finalized = jobs.finalize_locked(session, job_id, finalizers[kind])
        report.shards_closed += closed
        if closed:
            log.warning("reconciler: closed %d lost shards of ended job %s", closed, job_id)
        if finalized:
            report.finalized.append((kind, job_id))
            log.info("reconciler: finalized ended %s job %s", kind, job_id)
    return report


@contextlib.contextmanager
def single_flight(engine: Engine, name: str) -> Iterator[bool]:
    """A PostgreSQL session advisory lock: True inside for the one holder, False for anyone else meanwhile.
    The lock dies with the connection, so a killed holder never blocks the next pass."""
    with engine.connect() as conn:
        key = func.hashtextextended("alphaforge-single-flight:" + name, 0)
        got = bool(conn.scalar(select(func.pg_try_advisory_lock(key))))
        try:
            yield got
        finally:
            if got:
                conn.scalar(select(func.pg_advisory_unlock(key)))
            conn.commit()
