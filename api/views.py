"""Model -> response-schema conversions shared by the handlers."""

from __future__ import annotations

import uuid
from typing import Any

from api.schemas import CallbackView, JobLinks, JobView, Progress, Rejections, Reproducibility, ScriptRef
from shared.infra.models import Job, JobKind
from shared.jobs.backtests import read as runs


def job_links(job_id: uuid.UUID) -> JobLinks:
    base = f"/api/jobs/{job_id}"
    return JobLinks(self=base, results=f"{base}/results", cancel=f"{base}/cancel")


def callback_view(job: Job) -> CallbackView | None:
    if not job.callback_url:
        return None
    return CallbackView(
        url=job.callback_url,
        state=job.callback_state or "pending",
        attempts=job.callback_attempts,
        next_attempt_at=job.callback_next_at,
        last_error=job.callback_last_error,
    )


def progress(job: Job, tasks: runs.ValidationProgress | None = None) -> Progress:
    """The job's counters; ``percent`` counts symbols, and when the job has task shards (an optimisation's slices,
    a run's validation tasks: ``tasks``) it weighs them in backtests as the run view does: one per symbol when the
    job has symbol shards, ``Task.work`` per finished task. Without tasks (calculations): symbols only."""
    if tasks is None or tasks.tasks_total == 0:
        percent = 100.0 * job.symbols_done / job.symbols_total if job.symbols_total else 100.0
    else:
        has_symbol_shards = job.shards_total > tasks.tasks_total
        total = (job.symbols_total if has_symbol_shards else 0) + tasks.work_total
        done = (job.symbols_done if has_symbol_shards else 0) + tasks.work_done
        percent = 100.0 * done / total if total else 100.0
    return Progress(
        shards_total=job.shards_total,
        shards_done=job.shards_done,
        shards_failed=job.shards_failed,
        symbols_total=job.symbols_total,
        symbols_done=job.symbols_done,
        symbols_failed=job.symbols_failed,
        percent=round(percent, 2),
    )


def task_progress(job: Job) -> runs.ValidationProgress | None:
    """The job's task shards' progress (None for calculations, which have none: no query)."""
    if job.kind == JobKind.CALCULATION.value:
        return None
    from api import services

    with services().session_factory() as session:
        return runs.validation_progress(session, [job.id]).get(job.id)


def job_view(job: Job, rejections: dict[str, Any] | None = None, compute: dict[str, Any] | None = None) -> JobView:
    return JobView(
        job_id=str(job.id),
        kind=job.kind,
        status=job.status,
        owner_id=job.owner_id,
        script=(
            ScriptRef(script_id=str(job.script_id), version=job.script_version)
            if job.script_id is not None and job.script_version is not None
            else None
        ),
        column_name=job.column_name,
        progress=progress(job, task_progress(job)),
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        error=job.error,
        reproducibility=Reproducibility(
            script_sha256=job.script_sha256,
            symbols_sha256=job.symbols_sha256,
            data_sha256=job.data_sha256,
            data_version=job.data_version,
            symbol_count=job.symbols_total,
            start_date=job.start_date,
            end_date=job.end_date,
            timeframe=job.timeframe,
            adjustment=job.adjustment,
            params=job.params,
            shard_size=job.shard_size,
        ),
        links=job_links(job.id),
        rejections=Rejections.model_validate(rejections) if rejections is not None else None,
        callback=callback_view(job),
        compute=compute,
    )
