"""Thin Celery task for backtest-run shards: load by id, call ``shared.runs.run_shard``, decide retry.

Retry rules are the calculation shards' (``worker.tasks.retry_countdown``): a database outage is retried for as
long as it lasts, anything else ``shard_max_retries`` times, then the shard is failed with the reason.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import shared_task

from shared import artifacts, jobs, log_context, runs
from worker.celery_app import TASK_RUN_BACKTEST_SHARD
from worker.tasks import MAX_BACKOFF_S, ServicesTask, WorkerServices, is_database_outage, retry_countdown

log = logging.getLogger(__name__)


@shared_task(bind=True, base=ServicesTask, name=TASK_RUN_BACKTEST_SHARD, acks_late=True, max_retries=None)
def run_backtest_shard(self: Any, shard_id: int) -> str:
    services: WorkerServices = self.services
    attempt = self.request.retries + 1
    log_context.bind(shard_id=shard_id, attempt=attempt)
    log.info("backtest shard %s: attempt %s", shard_id, attempt)
    try:
        stored = runs.run_shard(services.session_factory, shard_id, events=services.events)
    except Exception as exc:
        countdown = retry_countdown(exc, attempt, services.settings.shard_max_retries)
        if countdown is not None:
            log.warning("backtest shard %s attempt %s failed (%s: %s); retrying in %.0f s", shard_id, attempt,
                        type(exc).__name__, exc, countdown)  # fmt: skip
            raise self.retry(exc=exc, countdown=countdown) from exc
        detail = (str(exc).strip().splitlines() or [""])[0][:300]
        log.exception("backtest shard %s failed for good", shard_id)
        try:
            jobs.fail_shard(services.session_factory, shard_id, f"gave up after {attempt} attempts: "
                            f"{type(exc).__name__}: {detail}", events=services.events)  # fmt: skip
        except Exception as record_exc:
            if is_database_outage(record_exc):
                raise self.retry(exc=record_exc, countdown=MAX_BACKOFF_S) from record_exc
            raise
        build_artifacts(services, shard_id)
        return "failed"
    build_artifacts(services, shard_id)
    return {None: "skipped", True: "stored", False: "duplicate"}[stored]


def build_artifacts(services: WorkerServices, shard_id: int) -> None:
    """After a shard: if that was the run's last open shard, write its artifacts and manifest. A failure here
    is logged and leaves the run without artifacts; it never undoes or retries the shard, whose results stand."""
    job_id = None
    try:
        job_id = runs.job_of_shard(services.session_factory, shard_id)
        if job_id is not None:
            artifacts.build_if_finished(services.session_factory, services.settings.data_dir, job_id)
    except Exception:
        log.exception("run %s: artifacts not built", job_id)
