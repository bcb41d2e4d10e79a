"""Thin Celery tasks for backtest runs: a shard (``shared.jobs.backtests.shard.run_shard``, retry decided by
``worker.tasks.run_shard_task``), then the run's artifacts once it is finalized; and the finish of a run that ended
with no shard left to finish it.

Retry rules are the calculation shards' (``worker.tasks.run_shard_task``): a database outage is retried for as
long as it lasts, anything else ``shard_max_retries`` times, then the shard is failed with the reason (and the run
finalized, ``shared.jobs.backtests.finalize.finalize_run``, if that ends it).
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from celery import shared_task

from shared.contract import TASK_BUILD_RUN_ARTIFACTS, TASK_RUN_BACKTEST_SHARD
from shared.infra.artifact_store import ArtifactStore
from shared.jobs.backtests import artifacts, finalize, read, shard
from worker.tasks import ServicesTask, WorkerServices, run_shard_task

log = logging.getLogger(__name__)


@shared_task(bind=True, base=ServicesTask, name=TASK_RUN_BACKTEST_SHARD, acks_late=True, max_retries=None)
def run_backtest_shard(self: Any, shard_id: int) -> str:
    outcome = run_shard_task(
        self, "backtest", shard_id, lambda services: shard.run_shard(services.session_factory, shard_id,
                                                                      events=services.events,
                                                                      limits=services.settings.sandbox),
        finalize=finalize.finalize_run,
    )  # fmt: skip
    build_artifacts(self.services, shard_id)  # not reached when the shard is retried (retry raises)
    return outcome


def build_artifacts(services: WorkerServices, shard_id: int) -> None:
    """After a shard: if that finalized the run, write its artifacts and manifest. A failure here is logged and
    leaves the run without artifacts; it never undoes or retries the shard, whose results stand."""
    job_id = None
    try:
        job_id = read.job_of_shard(services.session_factory, shard_id)
        if job_id is not None:
            store = ArtifactStore.from_settings(services.settings)
            artifacts.build_if_finished(services.session_factory, store, job_id)
    except Exception:
        log.exception("run %s: artifacts not built", job_id)


@shared_task(bind=True, base=ServicesTask, name=TASK_BUILD_RUN_ARTIFACTS, acks_late=True, max_retries=5)
def build_run_artifacts(self: Any, job_id: str) -> str:
    """Finish a run that ended with no shard running (cancelled while every shard waited: no shard task finishes
    to do it, so the cancel sends this; the reconciler too, after finalizing a run): finalize it, then build its
    artifacts. Both find their earlier result when done twice."""
    try:
        run_id = uuid.UUID(job_id)
        finalize.finish_ended_run(self.services.session_factory, run_id)
        store = ArtifactStore.from_settings(self.services.settings)
        built = artifacts.build_if_finished(self.services.session_factory, store, run_id)
    except Exception as exc:
        log.warning("run %s: not finished yet (%s: %s); retrying", job_id, type(exc).__name__, exc)
        raise self.retry(exc=exc, countdown=5) from exc
    return "built" if built is not None else "not final"
