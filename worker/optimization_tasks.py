"""Thin Celery tasks for optimisation slices: load by id, call ``optimizations.shard.run_shard``, decide retry
(the rules of every shard task: ``worker.tasks.run_shard_task``); after the job's last slice, its outcome and
artifacts."""

from __future__ import annotations

import logging
import uuid
from typing import Any

from celery import shared_task

from shared.contract import TASK_FINISH_OPTIMIZATION, TASK_RUN_OPTIMIZATION_SHARD
from shared.infra.artifact_store import ArtifactStore
from shared.jobs.backtests import service as runs
from shared.jobs.optimizations import finalize, shard
from worker.tasks import ServicesTask, WorkerServices, run_shard_task

log = logging.getLogger(__name__)


@shared_task(bind=True, base=ServicesTask, name=TASK_RUN_OPTIMIZATION_SHARD, acks_late=True, max_retries=None)
def run_optimization_shard(self: Any, shard_id: int) -> str:
    outcome = run_shard_task(
        self,
        "optimization",
        shard_id,
        lambda services: shard.run_shard(
            services.session_factory, shard_id, events=services.events, limits=services.settings.sandbox
        ),
    )
    finish(self.services, shard_id)  # not reached when the slice is retried (retry raises)
    return outcome


def finish(services: WorkerServices, shard_id: int) -> None:
    """If that was the job's last open slice: its outcome (best combo's full metrics or the walk-forward path)
    and artifacts. A failure is logged (GET computes the outcome on read); the slice's rows stand."""
    job_id = None
    try:
        job_id = runs.job_of_shard(services.session_factory, shard_id)
        if job_id is not None:
            store = ArtifactStore.from_settings(services.settings)
            finalize.build_if_finished(services.session_factory, store, job_id, limits=services.settings.sandbox)
    except Exception:
        log.exception("optimization %s: outcome or artifacts not built", job_id)


@shared_task(bind=True, base=ServicesTask, name=TASK_FINISH_OPTIMIZATION, acks_late=True, max_retries=5)
def finish_optimization(self: Any, job_id: str) -> str:
    """The outcome and artifacts of an optimisation cancelled while no slice ran (no slice task finishes to
    build them, so the cancel sends this)."""
    try:
        store = ArtifactStore.from_settings(self.services.settings)
        built = finalize.build_if_finished(
            self.services.session_factory, store, uuid.UUID(job_id), limits=self.services.settings.sandbox
        )
    except Exception as exc:
        log.warning("optimization %s: not finished yet (%s: %s); retrying", job_id, type(exc).__name__, exc)
        raise self.retry(exc=exc, countdown=5) from exc
    return "built" if built is not None else "not final"
