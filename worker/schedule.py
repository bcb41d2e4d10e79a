"""Celery beat's schedule, from Settings (kept apart from the tasks so that the Celery app can import it)."""

from __future__ import annotations

from typing import Any

from celery.schedules import crontab

from shared.config import QUEUE_MAINTENANCE, Settings

TASK_RECONCILE_SHARDS = "alphaforge.maintenance.reconcile_shards"
TASK_PRUNE_JOBS = "alphaforge.maintenance.prune_jobs"
TASK_PRUNE_RUNS = "alphaforge.maintenance.prune_runs"
TASK_PRUNE_OPTIMIZATIONS = "alphaforge.maintenance.prune_optimizations"
TASK_NIGHTLY_RUN = "alphaforge.nightly.start_run"
TASK_NIGHTLY_HARVEST = "alphaforge.nightly.harvest"
TASK_WEBHOOK_DISPATCH = "alphaforge.webhooks.dispatch"
TASK_WEBHOOK_DELIVER = "alphaforge.webhooks.deliver"  # one job's first attempt, sent when the job ends
NIGHTLY_TICK_EXPIRES_S = 3600  # a nightly tick no worker took within an hour is dropped, not run late


def beat_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    """Housekeeping entries. Each tick expires after one interval: if no worker took it by then, the next tick
    replaces it (no pile of stale passes after an outage)."""
    maint = settings.maintenance
    schedule: dict[str, dict[str, Any]] = {
        # Running shards whose lease expired: seconds after a worker dies (shared/leases.py).
        "reconcile-shards": {
            "task": TASK_RECONCILE_SHARDS,
            "schedule": maint.reconcile_interval_s,
            "kwargs": {"queued": False},
            "options": {"queue": QUEUE_MAINTENANCE, "expires": maint.reconcile_interval_s},
        },
        # Everything, queued shards past the grace too (a queue scan and a worker query when there are some).
        "reconcile-queued-shards": {
            "task": TASK_RECONCILE_SHARDS,
            "schedule": maint.queued_pass_interval_s,
            "options": {"queue": QUEUE_MAINTENANCE, "expires": maint.queued_pass_interval_s},
        },
        "prune-jobs": {
            "task": TASK_PRUNE_JOBS,
            "schedule": maint.retention_interval_s,
            "options": {"queue": QUEUE_MAINTENANCE, "expires": maint.retention_interval_s},
        },
        "prune-runs": {
            "task": TASK_PRUNE_RUNS,
            "schedule": maint.retention_interval_s,
            "options": {"queue": QUEUE_MAINTENANCE, "expires": maint.retention_interval_s},
        },
        "prune-optimizations": {
            "task": TASK_PRUNE_OPTIMIZATIONS,
            "schedule": maint.retention_interval_s,
            "options": {"queue": QUEUE_MAINTENANCE, "expires": maint.retention_interval_s},
        },
        "harvest-nightly": {
            "task": TASK_NIGHTLY_HARVEST,
            "schedule": maint.reconcile_interval_s,
            "options": {"queue": QUEUE_MAINTENANCE, "expires": maint.reconcile_interval_s},
        },
    }
    schedule["webhook-dispatch"] = {
        "task": TASK_WEBHOOK_DISPATCH,
        "schedule": settings.webhooks.poll_interval_s,
        "options": {"queue": QUEUE_MAINTENANCE, "expires": settings.webhooks.poll_interval_s},
    }
    if maint.nightly_schedule != "off":
        minute, hour, day_of_month, month_of_year, day_of_week = maint.nightly_schedule.split(" ")
        schedule["nightly-recalculation"] = {
            "task": TASK_NIGHTLY_RUN,
            # Read in the app's time zone: the exchange's (worker/celery_app.py sets it).
            "schedule": crontab(minute, hour, day_of_week, day_of_month, month_of_year),
            "options": {"queue": QUEUE_MAINTENANCE, "expires": NIGHTLY_TICK_EXPIRES_S},
        }
    return schedule
