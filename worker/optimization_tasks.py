"""Thin Celery tasks for optimisation slices: load by id, call ``optimizations.shard.run_shard``, decide retry
(the rules of every shard task: ``worker.tasks.run_shard_task``). The slice that leaves none open runs the kind's
finalize hook (outcome and artifacts) before the job reads final; a cancel with no slice running sends
``finish_optimization`` for it."""

from __future__ import annotations

import logging
import uuid
from typing import Any

from celery import shared_task

from shared.contract import TASK_FINISH_OPTIMIZATION, TASK_RUN_OPTIMIZATION_SHARD
from shared.infra.models import JobKind
from shared.jobs import pipeline as jobs
from shared.jobs.optimizations import shard
from worker.tasks import ServicesTask, finalizers, run_shard_task

log = logging.getLogger(__name__)


@shared_task(bind=True, base=ServicesTask, name=TASK_RUN_OPTIMIZATION_SHARD, acks_late=True, max_retries=None)
def run_optimization_shard(self: Any, shard_id: int) -> str:
    return run_shard_task(
        self,
        JobKind.OPTIMIZATION.value,
        shard_id,
        lambda services: shard.run_shard(
            services.session_factory,
            shard_id,
            events=services.events,
            limits=services.settings.sandbox,
            finalize=finalizers(services)[JobKind.OPTIMIZATION.value],
        ),
    )


@shared_task(bind=True, base=ServicesTask, name=TASK_FINISH_OPTIMIZATION, acks_late=True, max_retries=5)
def finish_optimization(self: Any, job_id: str) -> str:
    """The outcome and artifacts of an optimisation cancelled while no slice ran (no slice task finishes to
    build them, so the cancel sends this). Retried while the database is away; the reconciler's pass finishes
    what is left after that."""
    services = self.services
    try:
        done = jobs.finish_job(
            services.session_factory,
            uuid.UUID(job_id),
            finalizers(services)[JobKind.OPTIMIZATION.value],
            events=services.events,
        )
    except Exception as exc:
        log.warning("optimization %s: not finished yet (%s: %s); retrying", job_id, type(exc).__name__, exc)
        raise self.retry(exc=exc, countdown=5) from exc
    return "finished" if done else "nothing to do"
