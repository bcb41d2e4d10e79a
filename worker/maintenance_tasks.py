"""Housekeeping tasks Celery beat schedules (shared/contract.py): the shard reconciler, retention of calculation
jobs, of backtest runs and of optimisations, nightly runs and webhook deliveries; and the hook that starts a job's
webhook delivery as soon as the job ends.

Thin wrappers: the decisions live in shared/jobs/reconciler.py and shared/jobs/retention.py; here is only what needs
Celery and the broker: where a task id can still be found (a broker queue or a live worker), how a shard of each job
kind is published, each kind's finalization and what follows it.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import redis
from celery import Celery, shared_task, signals

from shared.contract import (
    TASK_BUILD_RUN_ARTIFACTS,
    TASK_FINISH_OPTIMIZATION,
    TASK_NIGHTLY_HARVEST,
    TASK_NIGHTLY_RUN,
    TASK_PRUNE_JOBS,
    TASK_PRUNE_OPTIMIZATIONS,
    TASK_PRUNE_RUNS,
    TASK_RECONCILE_SHARDS,
    TASK_RUN_BACKTEST_SHARD,
    TASK_RUN_CALCULATION_SHARD,
    TASK_RUN_INTERACTIVE,
    TASK_RUN_OPTIMIZATION_SHARD,
    TASK_WEBHOOK_DELIVER,
    TASK_WEBHOOK_DISPATCH,
    shard_enqueuer,
)
from shared.infra.artifact_store import ArtifactStore
from shared.infra.config import QUEUE_BULK, QUEUE_MAINTENANCE
from shared.infra.models import JobKind
from shared.jobs import nightly, reconciler, retention, webhooks
from shared.jobs.backtests import finalize as run_finalize
from shared.jobs.backtests import retention as run_retention
from shared.jobs.fairness import PRIORITY_STEPS
from shared.jobs.pipeline import Finalize, ShardTask
from worker import metrics_signals
from worker.optimization_tasks import finalize_optimization
from worker.tasks import ServicesTask, WorkerServices

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KindTasks:
    """What the worker side declares of a job kind: the Celery task that runs its shards, its finalization
    (shared/jobs/pipeline.py ``Finalize``, the one its shard tasks pass) and the task (argument: the job id) that
    follows a finalization the reconciler did (the job's artifacts: each finalizes first if needed, then builds)."""

    shard_task: str
    finalize: Finalize | None = None
    after_finalize: str | None = None


JOB_KINDS: dict[str, KindTasks] = {
    JobKind.CALCULATION.value: KindTasks(TASK_RUN_CALCULATION_SHARD),
    JobKind.BACKTEST.value: KindTasks(TASK_RUN_BACKTEST_SHARD, run_finalize.finalize_run, TASK_BUILD_RUN_ARTIFACTS),
    JobKind.OPTIMIZATION.value: KindTasks(TASK_RUN_OPTIMIZATION_SHARD, finalize_optimization, TASK_FINISH_OPTIMIZATION),
    JobKind.INTERACTIVE.value: KindTasks(TASK_RUN_INTERACTIVE),
}
"""Every job kind the reconciler heals, one line each: adding a kind is its package, its shard task, its schema
and its line here."""

SHARD_TASKS = {kind: tasks.shard_task for kind, tasks in JOB_KINDS.items()}
FINALIZERS = {kind: tasks.finalize for kind, tasks in JOB_KINDS.items() if tasks.finalize is not None}
AFTER_FINALIZE = {kind: tasks.after_finalize for kind, tasks in JOB_KINDS.items() if tasks.after_finalize is not None}

metrics_signals.connect(SHARD_TASKS)  # shard wall time into the shared histogram of GET /metrics

# kombu's Redis transport keeps a queue's messages of priority p > 0 in the list "<queue>\x06\x16<p>".
KOMBU_PRIORITY_SEP = "\x06\x16"
KOMBU_PRIORITY_STEPS = tuple(p for p in PRIORITY_STEPS if p > 0)
MAX_QUEUE_SCAN = 100_000  # beyond this many waiting messages in one queue, the pass is skipped (cannot tell)
SCAN_PAGE = 1_000
WORKER_QUERY_TIMEOUT_S = 2.0


def _message_task_id(raw: bytes | str) -> str | None:
    try:
        message = json.loads(raw)
        task_id = message.get("headers", {}).get("id") or message.get("properties", {}).get("correlation_id")
    except (ValueError, AttributeError):
        return None
    return task_id if isinstance(task_id, str) else None


def queue_keys(queues: Iterable[str]) -> list[str]:
    return [key for name in queues for key in (name, *(f"{name}{KOMBU_PRIORITY_SEP}{p}" for p in KOMBU_PRIORITY_STEPS))]


def task_ids_in_queues(client: redis.Redis, queues: Iterable[str], wanted: Collection[str]) -> set[str] | None:
    """Which of ``wanted`` wait in the broker's queue lists; None when a queue is too long to scan.

    Pages from the head (newest) while workers pop at the tail: a message pushed meanwhile shifts the rest
    towards the tail, so a page may show a message twice but never skips one still waiting.
    """
    found: set[str] = set()
    for key in queue_keys(queues):
        length = int(client.llen(key))
        if length > MAX_QUEUE_SCAN:
            log.warning("reconciler: queue %r holds %d messages (more than %d): not scanned", key, length,
                        MAX_QUEUE_SCAN)  # fmt: skip
            return None
        for start in range(0, length, SCAN_PAGE):
            for raw in client.lrange(key, start, start + SCAN_PAGE - 1):
                task_id = _message_task_id(raw)
                if task_id is not None and task_id in wanted:
                    found.add(task_id)
    return found


def task_ids_held_by_workers(app: Celery, wanted: Collection[str]) -> set[str] | None:
    """Which of ``wanted`` a live worker holds (prefetched, scheduled for a retry, or running); None when no
    worker answered at all."""
    replies: dict[str, dict[str, Any]] | None = app.control.inspect(timeout=WORKER_QUERY_TIMEOUT_S).query_task(*wanted)
    if not replies:
        return None
    return {task_id for reply in replies.values() for task_id in (reply or {})}


def live_task_ids(app: Celery, client: redis.Redis, wanted: Collection[str]) -> set[str] | None:
    """Queues first, then workers: a message a worker takes between the two looks is seen by the second."""
    queue_names = [q.name for q in app.conf.task_queues or ()]
    in_queues = task_ids_in_queues(client, queue_names, set(wanted))
    if in_queues is None:
        return None
    remaining = [t for t in wanted if t not in in_queues]
    if not remaining:
        return in_queues
    held = task_ids_held_by_workers(app, remaining)
    return None if held is None else in_queues | held


def shard_publisher(app: Celery) -> reconciler.Requeue:
    def publish(kind: str, queue: str, tasks: Sequence[ShardTask]) -> None:
        shard_enqueuer(app, SHARD_TASKS[kind], queue)(tasks)

    return publish


@shared_task(bind=True, base=ServicesTask, name=TASK_RECONCILE_SHARDS, acks_late=False, ignore_result=True)
def reconcile_shards(self: Any, queued: bool = True) -> dict[str, object]:
    """One reconciler pass (jobs/reconciler.py). Beat sends ``queued=False`` every ``ALPHAFORGE_RECONCILE_INTERVAL``
    (running shards whose lease expired: one cheap query when there are none) and a full pass less often
    (shared/contract.py); each kind runs one pass at a time, the two kinds may overlap (conditional updates). Then
    the finalize pass: ended jobs nobody finalized (with ``queued=False`` only those with a lost running shard)."""
    services: WorkerServices = self.services
    maint = services.settings.maintenance
    with reconciler.single_flight(services.engine, "reconcile-shards" if queued else "reconcile-leases") as mine:
        if not mine:
            return {"skipped": "another reconciler pass is running"}
        client = redis.Redis.from_url(services.settings.require_redis_url(), socket_timeout=10)
        try:
            report = reconciler.reconcile(
                services.session_factory,
                live_tasks=lambda wanted: live_task_ids(self.app, client, wanted),
                requeue=shard_publisher(self.app),
                kinds=SHARD_TASKS.keys(),
                grace_s=maint.reconcile_grace_s,
                max_requeues=maint.reconcile_max_requeues,
                queued=queued,
                finalizers=FINALIZERS,
            )
        finally:
            client.close()
        finalized = reconciler.finalize_ended(
            services.session_factory, finalizers=FINALIZERS, grace_s=maint.reconcile_grace_s, queued=queued
        )
    if report.requeued or report.failed:
        log.warning("reconciler pass: %s", report.as_dict())
    if report.failed:  # failing a shard may have ended its job: its webhook goes now, not at the next poll
        self.app.send_task(TASK_WEBHOOK_DISPATCH, queue=QUEUE_MAINTENANCE)
    # What follows a finalization (a run's artifacts), for the jobs this pass finalized or may have; a task that
    # finds its job not finalized does nothing.
    for kind, job_id in {*report.failed_jobs, *finalized.finalized}:
        if kind in AFTER_FINALIZE:
            self.app.send_task(AFTER_FINALIZE[kind], args=[str(job_id)])
    return {**report.as_dict(), **finalized.as_dict()}


@shared_task(bind=True, base=ServicesTask, name=TASK_PRUNE_JOBS, acks_late=False, ignore_result=True)
def prune_jobs(self: Any) -> dict[str, int]:
    services: WorkerServices = self.services
    maint = services.settings.maintenance
    with reconciler.single_flight(services.engine, "prune-jobs") as mine:
        if not mine:
            return {"by_age": 0, "by_count": 0}
        report = retention.prune(
            services.session_factory, max_age_days=maint.retention_days, max_jobs_per_owner=maint.retention_max_jobs
        )
        # Interactive runs by themselves: a user trying scripts all day never pushes out their calculation jobs.
        runs = retention.prune(
            services.session_factory,
            kinds=(JobKind.INTERACTIVE.value,),
            max_age_days=maint.retention_days,
            max_jobs_per_owner=maint.retention_max_jobs,
        )
    return {"by_age": report.by_age + runs.by_age, "by_count": report.by_count + runs.by_count}


@shared_task(bind=True, base=ServicesTask, name=TASK_PRUNE_RUNS, acks_late=False, ignore_result=True)
def prune_runs(self: Any) -> dict[str, int]:
    """Each owner keeps the newest ``ALPHAFORGE_RUN_RETENTION_KEEP`` finished backtest runs; older ones go with
    their artifacts."""
    services: WorkerServices = self.services
    with reconciler.single_flight(services.engine, "prune-runs") as mine:
        if not mine:
            return {"runs": 0, "artifact_dirs": 0}
        pruned = run_retention.prune_runs(
            services.session_factory,
            ArtifactStore.from_settings(services.settings),
            keep=services.settings.maintenance.run_retention_keep,
        )
    return {"runs": pruned.runs, "artifact_dirs": pruned.artifact_dirs}


@shared_task(bind=True, base=ServicesTask, name=TASK_PRUNE_OPTIMIZATIONS, acks_late=False, ignore_result=True)
def prune_optimizations(self: Any) -> dict[str, int]:
    """Each owner keeps the newest ``ALPHAFORGE_OPTIMIZATION_RETENTION_KEEP`` finished optimisations; older ones go
    with their result rows and artifacts."""
    services: WorkerServices = self.services
    with reconciler.single_flight(services.engine, "prune-optimizations") as mine:
        if not mine:
            return {"optimizations": 0, "artifact_dirs": 0}
        pruned = run_retention.prune_optimizations(
            services.session_factory,
            ArtifactStore.from_settings(services.settings),
            keep=services.settings.maintenance.optimization_retention_keep,
        )
    return {"optimizations": pruned.runs, "artifact_dirs": pruned.artifact_dirs}


@shared_task(bind=True, base=ServicesTask, name=TASK_NIGHTLY_RUN, acks_late=False, ignore_result=True)
def start_nightly_run(self: Any, trigger: str = "schedule", requested_by: str | None = None) -> dict[str, object]:
    """Beat's nightly tick (or ``python -m worker call alphaforge.nightly.start_run``): a no-op while the previous
    run is still going."""
    services: WorkerServices = self.services
    started = nightly.start_run(
        services.session_factory,
        trigger=trigger,
        requested_by=requested_by,
        enqueue=shard_enqueuer(self.app, queue=QUEUE_BULK),
        shard_size=services.settings.shard_size,
    )
    return {"run_id": str(started.run_id) if started.run_id else None,
            "running_id": str(started.running_id) if started.running_id else None,
            "jobs": started.jobs, "errors": started.errors}  # fmt: skip


@shared_task(bind=True, base=ServicesTask, name=TASK_NIGHTLY_HARVEST, acks_late=False, ignore_result=True)
def harvest_nightly(self: Any) -> int:
    services: WorkerServices = self.services
    client = redis.Redis.from_url(services.settings.require_redis_url(), socket_timeout=10)
    try:
        return nightly.harvest(services.session_factory, client)
    finally:
        client.close()


def _dispatch(services: WorkerServices, job_ids: list[uuid.UUID] | None = None) -> int:
    hooks = services.settings.webhooks
    return webhooks.dispatch(
        services.session_factory,
        allow_private=hooks.allow_private,
        max_attempts=hooks.max_attempts,
        backoff_base_s=hooks.backoff_s,
        timeout_s=hooks.timeout_s,
        job_ids=job_ids,
    )


@shared_task(bind=True, base=ServicesTask, name=TASK_WEBHOOK_DISPATCH, acks_late=False, ignore_result=True)
def dispatch_webhooks(self: Any) -> int:
    """Beat's poll: deliver the webhooks that are due (retries once their backoff has passed; a first attempt
    whose prompt delivery task was lost)."""
    return _dispatch(self.services)


@shared_task(bind=True, base=ServicesTask, name=TASK_WEBHOOK_DELIVER, acks_late=False, ignore_result=True)
def deliver_webhook(self: Any, job_id: str) -> int:
    """The first attempt of one job's webhook, sent by the worker that saw the job end."""
    return _dispatch(self.services, [uuid.UUID(job_id)])


def _start_delivery_when_job_ended(task: Any = None, args: Any = None, **_: Any) -> None:
    """After a shard task (any outcome): if its job has ended with a webhook not yet tried, send its delivery task
    now (on the maintenance queue) instead of leaving it to the next beat poll. One indexed query per shard; a
    duplicate delivery task finds the job delivered or locked and does nothing."""
    if task is None or getattr(task, "name", None) not in SHARD_TASKS.values() or not args:
        return
    try:
        with task.services.session_factory() as session:
            job_id = webhooks.first_delivery_due(session, int(args[0]))
        if job_id is not None:
            task.app.send_task(TASK_WEBHOOK_DELIVER, args=(str(job_id),), queue=QUEUE_MAINTENANCE)
    except Exception:  # the beat poll delivers it: never let this fail or slow the shard's bookkeeping
        log.warning("could not start the webhook delivery after shard %s; the beat poll will", args[0], exc_info=True)


signals.task_postrun.connect(_start_delivery_when_job_ended, weak=False, dispatch_uid="alphaforge-webhook-on-end")
