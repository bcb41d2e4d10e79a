"""Job status, results and cancellation: ``/api/jobs/<job_id>``."""

from __future__ import annotations

import logging
import uuid
from typing import Any

from flask import Response, jsonify
from flask_openapi3 import APIBlueprint, Tag
from sqlalchemy.orm import Session

from api import BEARER_SECURITY, ApiServices, services
from api.audit import audit
from api.auth import current_principal
from api.schemas import ErrorResponse, JobPath, JobView, ResultRow, ResultsPage, ResultsQuery
from api.views import job_view
from shared.accounts import quotas
from shared.accounts.access import require_owner, require_read
from shared.accounts.audit import AuditAction
from shared.contract import TASK_BUILD_RUN_ARTIFACTS, TASK_FINISH_OPTIMIZATION, TASK_WEBHOOK_DELIVER
from shared.errors import NotFound
from shared.infra import security
from shared.infra.config import QUEUE_MAINTENANCE
from shared.infra.events import RedisJobEvents
from shared.infra.models import Job, JobKind
from shared.jobs import pipeline as jobs
from shared.jobs.backtests import read as runs

log = logging.getLogger(__name__)

bp = APIBlueprint("jobs", __name__, url_prefix="/api/jobs", abp_tags=[Tag(name="jobs")], abp_security=BEARER_SECURITY)


def _job_id(raw: str) -> uuid.UUID:
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise NotFound(f"job {raw[:64]} not found", details={"job_id": raw[:64]}) from None


def _not_found(raw: object) -> NotFound:
    return NotFound(f"job {str(raw)[:64]} not found", details={"job_id": str(raw)[:64]})


def _readable_job(session: Session, raw_id: str) -> Job:
    """The job if the caller may read it (its owner, or an admin); someone else's job is a 404."""
    job = jobs.get_job(session, _job_id(raw_id))
    require_read(current_principal(), job.owner_id, _not_found(job.id))
    return job


@bp.get("/<job_id>", responses={200: JobView, 404: ErrorResponse})
def get_job(path: JobPath) -> Response:
    """Status, progress, timings, errors, what the sandbox rejected (per symbol, in plain words) and the
    reproducibility record of a job."""
    with services().session_factory() as session:
        job = _readable_job(session, path.job_id)
        rejections = security.job_rejections(session, job.id)
        compute = None
        if job.kind in (JobKind.CALCULATION.value, JobKind.INTERACTIVE.value):
            budget = quotas.budget_of(job)
            owner = job.owner_id and quotas.budget_standing(session, job.owner_id, budget, services().settings.quotas)
            compute = {"cpu_s": round(job.sandbox_cpu_s, 3), "budget": budget, "owner_today": owner or None}
        return jsonify(job_view(job, rejections, compute).model_dump(mode="json"))


def _printed(data: dict[str, Any] | None) -> dict[str, Any]:
    """A calculation result's captured print output, when its job asked for it."""
    if not data or "output" not in data:
        return {}
    return {"output": data["output"], "output_dropped": data.get("output_dropped", 0)}


@bp.get("/<job_id>/results", responses={200: ResultsPage, 404: ErrorResponse, 422: ErrorResponse})
def get_results(path: JobPath, query: ResultsQuery) -> Response:
    """Per-symbol results ordered by symbol, keyset-paged with ``cursor``; errors are per symbol."""
    job_id = _job_id(path.job_id)
    with services().session_factory() as session:
        # The page first: a bad cursor is a 422 before the job is looked up (and a 404 discards the page).
        rows, next_cursor = jobs.page_results(session, job_id, limit=query.limit, cursor=query.cursor)
        job = _readable_job(session, path.job_id)
        results = [
            ResultRow.model_validate({"symbol": r.symbol, "value": r.value, "error": r.error, **_printed(r.data)})
            for r in rows
        ]
        page = ResultsPage(
            job_id=str(job.id), column_name=job.column_name, status=job.status, results=results, next_cursor=next_cursor
        )
        return jsonify(page.model_dump(mode="json", exclude_unset=True))  # `output` only where it was captured


@bp.post("/<job_id>/cancel", responses={200: JobView, 404: ErrorResponse})
def cancel(path: JobPath) -> Response:
    """Cancel a queued or running job: queued shards are revoked, finished results are kept."""
    svc = services()
    job_id = _job_id(path.job_id)
    with svc.session_factory() as session:
        owner_id = jobs.get_job(session, job_id).owner_id
    require_owner(current_principal(), owner_id, _not_found(job_id))

    def record_cancellation(session: Session, job: Job) -> None:  # in the cancelling transaction
        audit(session, AuditAction.JOB_CANCELLED, resource_type="job", resource_id=job.id)

    job, task_ids = jobs.cancel_job(
        svc.session_factory, job_id, on_write=record_cancellation, events=RedisJobEvents(svc.redis)
    )
    after_cancel(svc, job, task_ids)
    return jsonify(job_view(job).model_dump(mode="json"))


def after_cancel(svc: ApiServices, job: Job, task_ids: list[str]) -> None:
    """What a committed cancel sets going, for any job kind: revoke the queued shards' tasks; and when no shard is
    still running (a running one does both when it stops at its checkpoint), ask a worker for a run's artifacts and
    start the job's webhook delivery. A publish that fails is logged: the beat poll delivers the webhook anyway."""
    if task_ids:
        svc.celery.control.revoke(task_ids)
    if job.status != "cancelled" or runs.has_running_shard(svc.session_factory, job.id):
        return
    follow_ups: list[tuple[str, str | None]] = []
    if job.kind == JobKind.BACKTEST.value:
        follow_ups.append((TASK_BUILD_RUN_ARTIFACTS, None))
    elif job.kind == JobKind.OPTIMIZATION.value:  # its outcome and artifacts (worker/optimization_tasks.py)
        follow_ups.append((TASK_FINISH_OPTIMIZATION, None))
    if job.callback_url and job.callback_state == "pending" and job.callback_attempts == 0:
        follow_ups.append((TASK_WEBHOOK_DELIVER, QUEUE_MAINTENANCE))
    for name, queue in follow_ups:
        try:
            svc.celery.send_task(name, args=[str(job.id)], **({"queue": queue} if queue else {}))
        except Exception:
            log.exception("job %s: could not send %s after the cancel", job.id, name)
