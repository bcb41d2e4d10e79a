"""Thin Celery tasks for backtest runs: a shard (``shared.jobs.backtests.shard.run_shard``, retry decided by
``worker.tasks.run_shard_task``), then the run's artifacts once it is finalized; and the finish of a run that ended
with no shard left to finish it.

Retry rules are the calculation shards' (``worker.tasks.run_shard_task``): a database outage is retried for as
long as it lasts, anything else ``shard_max_retries`` times, then the shard is failed with the reason (and the run
finalized, ``shared.jobs.backtests.finalize.finalize_run``, if that ends it).
"""

from __future__ import annotations

import logging
from typing import Any

from celery import shared_task

from shared.contract import TASK_BUILD_RUN_ARTIFACTS, TASK_RUN_BACKTEST_SHARD
from shared.infra.models import JobKind
from shared.jobs.backtests import artifacts, finalize, shard
from worker.tasks import ServicesTask, build_after_shard, finalize_then_build, run_shard_task

log = logging.getLogger(__name__)


@shared_task(bind=True, base=ServicesTask, name=TASK_RUN_BACKTEST_SHARD, acks_late=True, max_retries=None)
def run_backtest_shard(self: Any, shard_id: int) -> str:
    outcome = run_shard_task(
        self, JobKind.BACKTEST.value, shard_id, lambda services: shard.run_shard(services.session_factory, shard_id,
                                                                                 events=services.events,
                                                                                 limits=services.settings.sandbox,
                                                                                 batch_bars=services.settings.batch_bars),
        finalize=finalize.finalize_run,
    )  # fmt: skip
    # not reached when the shard is retried (retry raises)
    build_after_shard(self.services, JobKind.BACKTEST.value, shard_id, artifacts.build_if_finished)
    return outcome


@shared_task(bind=True, base=ServicesTask, name=TASK_BUILD_RUN_ARTIFACTS, acks_late=True, max_retries=5)
def build_run_artifacts(self: Any, job_id: str) -> str:
    """Finish a run that ended with no shard running (cancelled while every shard waited: no shard task finishes
    to do it, so the cancel sends this; the reconciler too, after finalizing a run): finalize it, then build its
    artifacts (``worker.tasks.finalize_then_build``)."""
    return finalize_then_build(self, JobKind.BACKTEST.value, job_id, finalize.finalize_run, artifacts.build_if_finished)
