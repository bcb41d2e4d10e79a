"""Celery beat's schedule, from Settings (kept apart from the tasks so that the Celery app can import it)."""

from __future__ import annotations

from typing import Any

from shared.config import QUEUE_MAINTENANCE, Settings

TASK_RECONCILE_SHARDS = "alphaforge.maintenance.reconcile_shards"
TASK_PRUNE_JOBS = "alphaforge.maintenance.prune_jobs"


def beat_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    """Housekeeping entries. Each tick expires after one interval: if no worker took it by then, the next tick
    replaces it (no pile of stale passes after an outage)."""
    maint = settings.maintenance
    return {
        "reconcile-shards": {
            "task": TASK_RECONCILE_SHARDS,
            "schedule": maint.reconcile_interval_s,
            "options": {"queue": QUEUE_MAINTENANCE, "expires": maint.reconcile_interval_s},
        },
        "prune-jobs": {
            "task": TASK_PRUNE_JOBS,
            "schedule": maint.retention_interval_s,
            "options": {"queue": QUEUE_MAINTENANCE, "expires": maint.retention_interval_s},
        },
    }
