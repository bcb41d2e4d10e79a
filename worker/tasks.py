"""Thin Celery task wrappers: load by id, call the service, decide retry."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis
import sqlalchemy.exc
from celery import Task, shared_task
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from shared.contract import TASK_RUN_CALCULATION_SHARD
from shared.infra import log_context
from shared.infra.artifact_store import ArtifactStore
from shared.infra.config import Settings
from shared.infra.db import Bounds, install_deadlines, make_engine, make_session_factory
from shared.infra.events import RedisJobEvents
from shared.infra.models import JobKind
from shared.jobs import leases
from shared.jobs import pipeline as jobs
from shared.jobs.calculations import service as calculations
from shared.jobs.optimizations import finalize as optimization_finalize
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


def finalizers(services: WorkerServices) -> dict[str, jobs.Finalize]:
    """The finalize hook of each job kind that has one (``shared.jobs.pipeline.Finalize``), bound to this worker's
    artifact store and sandbox: what runs before such a job reads final (kind -> hook)."""
    store = ArtifactStore.from_settings(services.settings)
    return {JobKind.OPTIMIZATION.value: optimization_finalize.Finalizer(store, services.settings.sandbox)}


MAX_BACKOFF_S = 60


def is_database_outage(exc: BaseException) -> bool:
    """The database is unreachable or broke the connection: no fault of the shard's, and nothing can be
    recorded until it is back."""
    return isinstance(exc, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError))


def retry_countdown(exc: BaseException, attempt: int, max_attempts: int) -> float | None:
    """Seconds until the next attempt, or None to give up on the shard.

    A database outage is retried for as long as it lasts (backoff capped at a minute): giving up would
    need the database too. Anything else (sandbox start failure, a bug) gets ``max_attempts`` tries.
    """
    countdown = float(min(2**attempt, MAX_BACKOFF_S))
    if is_database_outage(exc) or attempt <= max_attempts:
        return countdown
    return None


def lease_heartbeat(task: Any, services: WorkerServices, shard_id: int) -> leases.Heartbeat:
    """The lease the shard's claim takes and the thread that renews it while ``run`` goes (shared/jobs/leases.py)."""
    maint = services.settings.maintenance
    holder = f"{task.request.hostname or socket.gethostname()} pid {os.getpid()}"
    terms = leases.LeaseTerms(holder=holder, lease_s=maint.shard_lease_s)
    return leases.Heartbeat(services.lease_engine, shard_id, terms, maint.shard_lease_renew_s)


def run_shard_task(task: Any, kind: str, shard_id: int, run: Callable[[WorkerServices], bool | None]) -> str:
    """What every shard task does around its service call: log context, the shard's lease kept alive while it runs
    (:func:`lease_heartbeat`), then retry with backoff (:func:`retry_countdown`) or give up and fail the shard
    with the reason. ``run`` returns what the job service's ``run_shard`` does: None (nothing to do), True
    (stored) or False (a duplicate delivery)."""
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
            log.warning("%s shard %s attempt %s failed (%s: %s); retrying in %.0f s", kind, shard_id, attempt,
                        type(exc).__name__, exc, countdown)  # fmt: skip
            raise task.retry(exc=exc, countdown=countdown) from exc
        detail = (str(exc).strip().splitlines() or [""])[0][:300]
        log.exception("%s shard %s failed for good", kind, shard_id)
        try:
            jobs.fail_shard(services.session_factory, shard_id, f"gave up after {attempt} attempts: "
                            f"{type(exc).__name__}: {detail}", events=services.events,
                            finalize=finalizers(services).get(kind))  # fmt: skip
        except Exception as record_exc:
            if is_database_outage(record_exc):
                raise task.retry(exc=record_exc, countdown=MAX_BACKOFF_S) from record_exc
            raise
        return "failed"
    return {None: "skipped", True: "stored", False: "duplicate"}[stored]


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
        ),
    )
