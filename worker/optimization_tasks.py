"""Thin Celery tasks for optimisation slices: load by id, call ``optimizations.shard.run_shard``, decide retry
(the rules of every shard task: ``worker.tasks.run_shard_task``), as for backtest runs. The slice that ends the job
stores its outcome in the same transaction (the kind's finalization, :func:`finalize_optimization`), then the
worker builds its artifacts; ``finish_optimization`` does both for one that ended with no slice left to do it."""

from __future__ import annotations

import logging
from typing import Any

from celery import current_app, shared_task
from sqlalchemy.orm import Session

from shared.contract import TASK_FINISH_OPTIMIZATION, TASK_RUN_OPTIMIZATION_SHARD
from shared.infra.models import Job, JobKind
from shared.jobs.optimizations import artifacts, finalize, shard
from worker.tasks import ServicesTask, build_after_shard, finalize_then_build, run_shard_task

log = logging.getLogger(__name__)


def finalize_optimization(session: Session, job: Job) -> None:
    """The optimisation kind's finalization (``shared.jobs.pipeline.Finalize``) in this worker: the outcome, with the
    worker's sandbox limits (a script strategy's best combo runs in the sandbox)."""
    finalize.finalize_optimization(session, job, limits=current_app.conf.alphaforge_settings.sandbox)


@shared_task(bind=True, base=ServicesTask, name=TASK_RUN_OPTIMIZATION_SHARD, acks_late=True, max_retries=None)
def run_optimization_shard(self: Any, shard_id: int) -> str:
    outcome = run_shard_task(
        self,
        JobKind.OPTIMIZATION.value,
        shard_id,
        lambda services: shard.run_shard(
            services.session_factory,
            shard_id,
            events=services.events,
            limits=services.settings.sandbox,
            finalize=finalize_optimization,
        ),
        finalize=finalize_optimization,
    )
    # not reached when the slice is retried (retry raises)
    build_after_shard(self.services, JobKind.OPTIMIZATION.value, shard_id, artifacts.build_if_finished)
    return outcome


@shared_task(bind=True, base=ServicesTask, name=TASK_FINISH_OPTIMIZATION, acks_late=True, max_retries=5)
def finish_optimization(self: Any, job_id: str) -> str:
    """Finish an optimisation that ended with no slice running (cancelled while every slice waited: the cancel sends
    this; the reconciler too, after finalizing one): its outcome, then its artifacts
    (``worker.tasks.finalize_then_build``)."""
    return finalize_then_build(
        self, JobKind.OPTIMIZATION.value, job_id, finalize_optimization, artifacts.build_if_finished
    )
