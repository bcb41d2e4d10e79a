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
  ``Maintenance.queued_pass_interval_s``).

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
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections import defaultdict
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import ColumnElement, Engine, Select, and_, func, or_, select, text, update
from sqlalchemy.orm import Session, sessionmaker

from shared.infra.db import session_scope
from shared.infra.events import JobEvents
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


@dataclass
class ReconcileReport:
    candidates: int = 0
    alive: int = 0
    requeued: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    skipped: str | None = None  # why this pass left (some) candidates unjudged
    finalized: list[str] = field(default_factory=list)  # jobs finish_unfinalized finished (the full pass)

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"candidates": self.candidates, "alive": self.alive, "requeued": len(self.requeued),
                                  "failed": len(self.failed), "skipped": self.skipped}  # fmt: skip
        if self.finalized:
            out["finalized"] = len(self.finalized)
        return out


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
        published_before = func.now() - func.make_interval(0, 0, 0, 0, 0, 0, grace_s)
        stale = and_(JobShard.status.in_(_OPEN), _no_live_lease(), JobShard.enqueued_at < published_before)
        wanted = or_(expired, stale)
    columns = (JobShard.id, JobShard.job_id, Job.kind, Job.queue, JobShard.task_id, JobShard.status, JobShard.requeues)
    return (
        select(*columns, expired)
        .join(Job, Job.id == JobShard.job_id)
        .where(wanted, Job.status.in_(_ACTIVE), Job.kind.in_(list(kinds)))
        .order_by(expired.desc(), JobShard.enqueued_at, JobShard.id)
        .limit(limit)
    )


def find_candidates(
    session: Session, *, grace_s: float, kinds: Collection[str], limit: int, queued: bool = True
) -> list[Candidate]:
    rows = session.execute(candidate_query(grace_s=grace_s, kinds=kinds, limit=limit, queued=queued)).all()
    return [Candidate(s, j, k, q, t, st, r, bool(e)) for s, j, k, q, t, st, r, e in rows]


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
        shards whose lease expired (the frequent pass). ``finalizers``: the finalize hooks of the kinds that have one
    (kind -> hook), for the shards it fails. Safe to run concurrently with workers and with other passes
        (every change is a conditional update); run one pass of each kind at a time (:func:`single_flight`)."""
    report = ReconcileReport()
    with factory() as session:
        candidates = find_candidates(session, grace_s=grace_s, kinds=kinds, limit=limit, queued=queued)
    report.candidates = len(candidates)
    if not candidates:
        return report
    alive = live_tasks([c.task_id for c in candidates])
    judged = candidates
    if alive is None:
        judged = [c for c in candidates if c.lease_expired]
        left = len(candidates) - len(judged)
        report.skipped = "could not tell which tasks are alive (broker or workers did not answer)"
        log.warning("reconciler: %s; %d shards left for the next pass, %d whose lease expired judged vanished",
                    report.skipped, left, len(judged))  # fmt: skip
        alive = set()
    vanished = [c for c in judged if c.task_id not in alive]
    report.alive = len(judged) - len(vanished)
    to_publish: dict[tuple[str, str], list[jobs.ShardTask]] = defaultdict(list)
    for candidate in vanished:
        if candidate.requeues >= max_requeues:
            reason = gave_up_reason(candidate.requeues)
            finalize = (finalizers or {}).get(candidate.kind)
            if jobs.fail_shard(factory, candidate.shard_id, reason, finalize=finalize):
                report.failed.append(candidate.shard_id)
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


def unfinalized_jobs(session: Session, kinds: Sequence[str], *, grace_s: float, limit: int = 100) -> list[uuid.UUID]:
    """Jobs of the given kinds (those with a finalize hook) that ``jobs.finish_job`` should have finished and did
    not (its worker died, or a cancel's follow-up task was lost): not finalized, no shard open, and either active
    with every shard finished or final already, for more than ``grace_s`` seconds (a live worker may be at it).
    ``ix_jobs_unfinalized`` holds only unfinalized rows."""
    before = func.now() - func.make_interval(0, 0, 0, 0, 0, 0, grace_s)
    open_shard = select(JobShard.id).where(JobShard.job_id == Job.id, JobShard.status.in_(_OPEN)).exists()
    last_shard_end = select(func.max(JobShard.finished_at)).where(JobShard.job_id == Job.id).scalar_subquery()
    ended = func.coalesce(Job.finished_at, last_shard_end, Job.created_at)
    stalled = and_(Job.status.in_(_ACTIVE), Job.shards_done >= Job.shards_total)
    query = (
        select(Job.id)
        .where(
            Job.kind.in_(list(kinds)),
            Job.finalized_at.is_(None),
            or_(stalled, Job.status.not_in(_ACTIVE)),
            ~open_shard,
            ended < before,
        )
        .order_by(Job.created_at)
        .limit(limit)
    )
    return list(session.scalars(query))


def finish_unfinalized(
    factory: sessionmaker[Session],
    finalizers: Mapping[str, jobs.Finalize],
    *,
    grace_s: float,
    events: JobEvents | None = None,
    limit: int = 100,
) -> list[uuid.UUID]:
    """Finish the :func:`unfinalized_jobs` of the kinds with a finalize hook (``finalizers``: kind -> hook): the
    ones a dead worker left. A job whose hook fails on the database stays for the next pass."""
    if not finalizers:
        return []
    with factory() as session:
        job_ids = unfinalized_jobs(session, list(finalizers), grace_s=grace_s, limit=limit)
        kinds = dict(session.execute(select(Job.id, Job.kind).where(Job.id.in_(job_ids))).tuples().all())
    finished = []
    for job_id in job_ids:
        try:
            if jobs.finish_job(factory, job_id, finalizers[kinds[job_id]], events=events):
                finished.append(job_id)
        except Exception:
            log.exception("reconciler: job %s could not be finalized; the next pass tries again", job_id)
    if finished:
        log.warning("reconciler: finalized %d jobs a worker left unfinished: %s", len(finished), finished)
    return finished


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
