"""Thin Celery task for backtest-run shards: load by id, call ``shared.jobs.backtests.service.run_shard``, decide retry.

Retry rules are the calculation shards' (``worker.tasks.run_shard_task``): a database outage is retried for as
long as it lasts, anything else ``shard_max_retries`` times, then the shard is failed with the reason.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from celery import shared_task

from shared.contract import TASK_BUILD_RUN_ARTIFACTS, TASK_RUN_BACKTEST_SHARD
from shared.infra.artifact_store import ArtifactStore
from shared.jobs.backtests import artifacts
from shared.jobs.backtests import service as runs
from worker.tasks import ServicesTask, WorkerServices, run_shard_task

log = logging.getLogger(__name__)


@shared_task(bind=True, base=ServicesTask, name=TASK_RUN_BACKTEST_SHARD, acks_late=True, max_retries=None)
def run_backtest_shard(self: Any, shard_id: int) -> str:
    outcome = run_shard_task(
        self, "backtest", shard_id, lambda services: runs.run_shard(services.session_factory, shard_id,
                                                                     events=services.events,
                                                                     limits=services.settings.sandbox)
    )  # fmt: skip
    build_artifacts(self.services, shard_id)  # not reached when the shard is retried (retry raises)
    return outcome


def build_artifacts(services: WorkerServices, shard_id: int) -> None:
    """After a shard: if that was the run's last open shard, write its artifacts and manifest. A failure here
    is logged and leaves the run without artifacts; it never undoes or retries the shard, whose results stand."""
    job_id = None
    try:
        job_id = runs.job_of_shard(services.session_factory, shard_id)
        if job_id is not None:
            store = ArtifactStore.from_settings(services.settings)
            artifacts.build_if_finished(services.session_factory, store, job_id)
    except Exception:
        log.exception("run %s: artifacts not built", job_id)


@shared_task(bind=True, base=ServicesTask, name=TASK_BUILD_RUN_ARTIFACTS, acks_late=True, max_retries=5)
def build_run_artifacts(self: Any, job_id: str) -> str:
    """The artifacts of a run that ended with no shard running (cancelled while every shard waited): no shard
    task finishes to build them, so the cancel sends this. Building twice finds the first manifest."""
    try:
        store = ArtifactStore.from_settings(self.services.settings)
        built = artifacts.build_if_finished(self.services.session_factory, store, uuid.UUID(job_id))
    except Exception as exc:
        log.warning("run %s: artifacts not built yet (%s: %s); retrying", job_id, type(exc).__name__, exc)
        raise self.retry(exc=exc, countdown=5) from exc
    return "built" if built is not None else "not final"
