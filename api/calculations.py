"""Calculation jobs: ``POST /api/custom-calculations/execute``."""

from __future__ import annotations

from flask import Response, jsonify
from flask_openapi3 import APIBlueprint, Tag

from api import services
from api.auth import current_owner_id
from api.schemas import CalculationExecuteBody, ErrorResponse, JobAccepted
from api.views import job_links
from shared.calculations import CalculationRequest, submit_calculation
from shared.errors import ValidationFailed
from worker.celery_app import shard_enqueuer

bp = APIBlueprint("calculations", __name__, url_prefix="/api/custom-calculations", abp_tags=[Tag(name="calculations")])


@bp.post(
    "/execute",
    responses={202: JobAccepted, 400: ErrorResponse, 415: ErrorResponse, 422: ErrorResponse, 503: ErrorResponse},
)
def execute(body: CalculationExecuteBody) -> Response:
    """Submit a calculation job: the script runs in the sandbox once per symbol; poll the job for progress."""
    svc = services()
    settings = svc.settings
    if len(body.script) > settings.max_script_chars:
        raise ValidationFailed.for_field(
            "script", f"script is {len(body.script):,} characters; at most {settings.max_script_chars:,} allowed"
        )
    symbols = list(dict.fromkeys(body.stock_symbols))
    if len(symbols) > settings.max_symbols_per_job:
        raise ValidationFailed.for_field(
            "stock_symbols", f"{len(symbols):,} symbols; at most {settings.max_symbols_per_job:,} per job"
        )
    request = CalculationRequest(
        script=body.script,
        column_name=body.column_name,
        symbols=symbols,
        start_date=body.start_date,
        end_date=body.end_date,
        params=body.params,
        owner_id=current_owner_id(),
    )
    job = submit_calculation(
        svc.session_factory, request, shard_size=settings.shard_size, enqueue=shard_enqueuer(svc.celery)
    )
    links = job_links(job.id)
    accepted = JobAccepted(
        job_id=str(job.id), status=job.status, shards=job.shards_total, symbols=job.symbols_total, links=links
    )
    response = jsonify(accepted.model_dump(mode="json"))
    response.status_code = 202
    response.headers["Location"] = links.self
    return response
