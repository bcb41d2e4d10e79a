"""Thin Celery task wrappers: load by id, call the service, decide retry."""

from __future__ import annotations

import logging
import os
import random
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis
import sqlalchemy.exc
from celery import Task, shared_task
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from shared.contract import TASK_RUN_CALCULATION_SHARD, TASK_WEBHOOK_DELIVER
from shared.infra import log_context
from shared.infra.artifact_store import ArtifactStore
from shared.infra.config import QUEUE_MAINTENANCE, Settings
from shared.infra.db import Bounds, install_deadlines, make_engine, make_session_factory
from shared.infra.events import RedisJobEvents
from shared.jobs import backoff, calculations, leases, webhooks
from shared.jobs import pipeline as jobs
from shared.jobs.backtests import read as run_read
from shared.jobs.backtests.read import job_of_shard
from shared.marketdata import providers, store
from shared.sandbox.runner import run_script

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerServices:
    settings: Settings
    engine: Engine
    session_factory: sessionmaker[Session]
    events: RedisJobEvents
    lease_engine: Engine  # the lease heartbeat's own connection (shared/jobs/leases.py), never one a task needs


class ServicesTask(Task):
    """Builds the database engine lazily, once per worker process (after the prefork fork)."""

    _services: WorkerServices | None = None

    @property
    def services(self) -> WorkerServices:
        if self._services is None:
            settings: Settings = self.app.conf.alphaforge_settings
            install_deadlines()  # a frozen database ends a wait with an error (then a retry), never a hang
            store.configure(settings.bar_cache_mb, copy=True)
            run_read.configure(settings.run_batch_mb)  # finalization and artifacts: curves a batch at a time
            providers.configure(settings.bar_provider, settings.bar_parquet_dir, settings.bar_cache_mb)
            bounds = Bounds.for_workers(settings.timeouts)
            engine = make_engine(settings.require_database_url(), pool_size=2, bounds=bounds)
            events = RedisJobEvents(
                redis.Redis.from_url(settings.require_redis_url(), socket_connect_timeout=2, socket_timeout=5)
            )
            # A renewal is one tiny UPDATE: bounded like an API statement, so a frozen database costs it a missed beat.
            lease_engine = make_engine(settings.require_database_url(), pool_size=1,
                                       bounds=Bounds.for_api(settings.timeouts))  # fmt: skip
            self._services = WorkerServices(settings, engine, make_session_factory(engine), events, lease_engine)
        return self._services


MAX_BACKOFF_S = 60


def is_database_outage(exc: BaseException) -> bool:
    """The database is unreachable or broke the connection: no fault of the shard's, and nothing can be
    recorded until it is back."""
    return isinstance(exc, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError))


def retry_countdown(
    exc: BaseException, attempt: int, max_attempts: int, *, uniform: backoff.Uniform = random.uniform
) -> float | None:
    """Seconds until the next attempt, or None to give up on the shard.

    A database outage is retried for as long as it lasts: giving up would need the database too. Anything else
    (sandbox start failure, a bug) gets ``max_attempts`` tries. The wait after attempt n is drawn from
    [0, min(2^n, ``MAX_BACKOFF_S``)] (full jitter, shared/jobs/backoff.py): the shards of every worker that lost
    the database at once do not all retry in the same second when it is back.
    """
    if is_database_outage(exc) or attempt <= max_attempts:
        return backoff.full_jitter_s(attempt, 1.0, MAX_BACKOFF_S, uniform=uniform)
    return None


def lease_heartbeat(task: Any, services: WorkerServices, shard_id: int) -> leases.Heartbeat:
    """The lease the shard's claim takes and the thread that renews it while ``run`` goes (shared/jobs/leases.py)."""
    maint = services.settings.maintenance
    holder = f"{task.request.hostname or socket.gethostname()} pid {os.getpid()}"
    terms = leases.LeaseTerms(holder=holder, lease_s=maint.shard_lease_s)
    return leases.Heartbeat(services.lease_engine, shard_id, terms, maint.shard_lease_renew_s)


def run_shard_task(
    task: Any,
    kind: str,
    shard_id: int,
    run: Callable[[WorkerServices], bool | None],
    *,
    finalize: jobs.Finalize | None = None,
) -> str:
    """What every shard task does around its service call: log context, the shard's lease kept alive while it runs
    (:func:`lease_heartbeat`), then retry with backoff (:func:`retry_countdown`) or give up and fail the shard
    with the reason (and ``finalize``, the kind's finalization, if that ends the job). ``run`` returns what the job
    service's ``run_shard`` does: None (nothing to do), True (stored) or False (a duplicate delivery)."""
    services: WorkerServices = task.services
    attempt = task.request.retries + 1
    log_context.bind(shard_id=shard_id, attempt=attempt)
    log.info("%s shard %s: attempt %s", kind, shard_id, attempt)
    try:
        with lease_heartbeat(task, services, shard_id):
            stored = run(services)
    except Exception as exc:
        countdown = retry_countdown(exc, attempt, services.settings.shard_max_retries)
        if countdown is not None:
            log.warning("%s shard %s attempt %s failed (%s: %s); retrying in %.1f s", kind, shard_id, attempt,
                        type(exc).__name__, exc, countdown)  # fmt: skip
            raise task.retry(exc=exc, countdown=countdown) from exc
        detail = (str(exc).strip().splitlines() or [""])[0][:300]
        log.exception("%s shard %s failed for good", kind, shard_id)
        try:
            jobs.fail_shard(services.session_factory, shard_id, f"gave up after {attempt} attempts: "
                            f"{type(exc).__name__}: {detail}", events=services.events, finalize=finalize)  # fmt: skip
        except Exception as record_exc:
            if is_database_outage(record_exc):
                raise task.retry(exc=record_exc, countdown=MAX_BACKOFF_S) from record_exc
            raise
        return "failed"
    return {None: "skipped", True: "stored", False: "duplicate"}[stored]


BuildArtifacts = Callable[[sessionmaker[Session], ArtifactStore, uuid.UUID], object | None]
"""A job kind's artifact build (files outside the database, after its finalization committed): the manifest, or None
while the job is not finalized. Idempotent: a second call finds the first's manifest."""


def build_after_shard(services: WorkerServices, kind: str, shard_id: int, build: BuildArtifacts) -> None:
    """After a shard task: if that finalized its job, build the job's artifacts. A failure here is logged and leaves
    the job without artifacts; it never undoes or retries the shard, whose results (and the job's finalization)
    stand."""
    job_id = None
    try:
        job_id = job_of_shard(services.session_factory, shard_id)
        if job_id is not None:
            build(services.session_factory, ArtifactStore.from_settings(services.settings), job_id)
    except Exception:
        log.exception("%s %s: artifacts not built", kind, job_id)


def finalize_then_build(task: Any, kind: str, job_id: str, finalize: jobs.Finalize, build: BuildArtifacts) -> str:
    """The follow-up task of a job that ended with no shard left to finalize it (cancelled while every shard waited:
    the cancel sends it; the reconciler too, after its finalize pass): ``pipeline.finalize_job`` with the kind's
    finalization, then its artifacts, then the job's first webhook delivery if due. Both find their earlier result when
    done twice; retried on any error."""
    services: WorkerServices = task.services
    try:
        ended = uuid.UUID(job_id)
        jobs.finalize_job(services.session_factory, ended, finalize)
        built = build(services.session_factory, ArtifactStore.from_settings(services.settings), ended)
    except Exception as exc:
        log.warning("%s %s: not finished yet (%s: %s); retrying", kind, job_id, type(exc).__name__, exc)
        raise task.retry(exc=exc, countdown=5) from exc
    start_first_delivery(task, ended)
    return "built" if built is not None else "not final"


def start_first_delivery(task: Any, job_id: uuid.UUID) -> None:
    """Send the job's first webhook delivery now if it is due: after its finalization committed, so the receiver
    finds the job's views complete (a delivery sent earlier, by the cancel, skips the job while this task holds its
    row). A failure is logged: the beat poll delivers it anyway."""
    try:
        with task.services.session_factory() as session:
            due = webhooks.job_first_delivery_due(session, job_id)
        if due:
            task.app.send_task(TASK_WEBHOOK_DELIVER, args=(str(job_id),), queue=QUEUE_MAINTENANCE)
    except Exception:
        log.warning("could not start the webhook delivery of job %s; the beat poll will", job_id, exc_info=True)


@shared_task(bind=True, base=ServicesTask, name=TASK_RUN_CALCULATION_SHARD, acks_late=True, max_retries=None)
def run_calculation_shard(self: Any, shard_id: int) -> str:
    return run_shard_task(
        self,
        "calculation",
        shard_id,
        lambda services: calculations.run_shard(
            services.session_factory,
            shard_id,
            limits=services.settings.sandbox,
            runner=run_script,
            events=services.events,
            batch_bars=services.settings.batch_bars,
            job_output_chars=services.settings.sandbox_bounds.job_output_chars,
            quotas=services.settings.quotas,
        ),
    )
