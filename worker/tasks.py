"""Thin Celery task wrappers: load by id, call the service, decide retry."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from celery import Task, shared_task
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from shared import calculations, jobs
from shared.config import Settings
from shared.db import make_engine, make_session_factory
from worker.celery_app import TASK_RUN_CALCULATION_SHARD
from worker.sandbox_runner import run_script

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerServices:
    settings: Settings
    engine: Engine
    session_factory: sessionmaker[Session]


class ServicesTask(Task):
    """Builds the database engine lazily, once per worker process (after the prefork fork)."""

    _services: WorkerServices | None = None

    @property
    def services(self) -> WorkerServices:
        if self._services is None:
            settings: Settings = self.app.conf.alphaforge_settings
            engine = make_engine(settings.require_database_url(), pool_size=2)
            self._services = WorkerServices(settings, engine, make_session_factory(engine))
        return self._services


@shared_task(bind=True, base=ServicesTask, name=TASK_RUN_CALCULATION_SHARD, acks_late=True, max_retries=None)
def run_calculation_shard(self: Any, shard_id: int) -> str:
    services: WorkerServices = self.services
    settings = services.settings
    try:
        stored = calculations.run_shard(services.session_factory, shard_id, limits=settings.sandbox, runner=run_script)
    except Exception as exc:
        attempt = self.request.retries + 1
        if attempt > settings.shard_max_retries:
            detail = (str(exc).strip().splitlines() or [""])[0][:300]
            reason = f"gave up after {attempt} attempts: {type(exc).__name__}: {detail}"
            log.exception("shard %s failed for good", shard_id)
            jobs.fail_shard(services.session_factory, shard_id, reason)
            return "failed"
        log.warning("shard %s attempt %s failed (%s); retrying", shard_id, attempt, exc)
        raise self.retry(exc=exc, countdown=min(2**attempt, 30)) from exc
    return {None: "skipped", True: "stored", False: "duplicate"}[stored]
