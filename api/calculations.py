"""Calculation jobs: ``POST /api/custom-calculations/execute``."""

from __future__ import annotations

import uuid

from flask import Response, jsonify
from flask_openapi3 import APIBlueprint, Tag
from sqlalchemy.orm import Session

from api import BEARER_SECURITY, services
from api.audit import audit
from api.auth import current_principal
from api.interactive_schemas import TryBody
from api.schemas import CalculationExecuteBody, ErrorResponse, JobAccepted
from api.views import job_links
from shared.accounts import quotas
from shared.accounts.audit import AuditAction
from shared.contract import shard_enqueuer
from shared.errors import ValidationFailed
from shared.infra.events import RedisJobEvents
from shared.infra.models import Job
from shared.jobs import webhooks
from shared.jobs.calculations import CalculationRequest, submit_calculation
from shared.library import scripts, universes

bp = APIBlueprint(
    "calculations",
    __name__,
    url_prefix="/api/custom-calculations",
    abp_tags=[Tag(name="calculations")],
    abp_security=BEARER_SECURITY,
)


def script_source(body: CalculationExecuteBody | TryBody) -> tuple[str, uuid.UUID | None, int | None]:
    """The exact text to run, and (when it is a saved script) which script and version it is."""
    if body.script is not None and body.script_id is not None:
        raise ValidationFailed.for_field("script_id", "send either script or script_id, not both")
    if body.script is None and body.script_id is None:
        raise ValidationFailed.for_field(
            "script", "a script (a string of Python) is required, or the script_id of a saved script"
        )
    if body.version is not None and body.script_id is None:
        raise ValidationFailed.for_field("version", "version applies to a saved script: send it with script_id")
    if body.script is not None:
        return body.script, None, None
    assert body.script_id is not None
    with services().session_factory() as session:
        script = scripts.get_owned_script(session, current_principal(), body.script_id)
        if script.kind != scripts.KIND_CALCULATION:
            raise ValidationFailed.for_field(
                "script_id", f"script {script.id} is a {script.kind} script; backtest it with POST /api/runs"
            )
        if body.version is None or body.version == script.version:
            return script.code, script.id, script.version
        version = scripts.get_version(session, script, body.version)
        return version.code, script.id, version.version


def check_script_length(field: str, source: str) -> None:
    """422 naming ``field`` when the source is past ALPHAFORGE_MAX_SCRIPT_CHARS."""
    limit = services().settings.max_script_chars
    if len(source) > limit:
        raise ValidationFailed.for_field(field, f"{field} is {len(source):,} characters; at most {limit:,} allowed")


def check_sandbox_limits(timeout: float | None, memory: int | None, names: tuple[str, str]) -> None:
    """422 naming the field (``names``: the timeout's and the memory's) of a limit outside the operator's bounds;
    None is the default, always allowed."""
    bounds = services().settings.sandbox_bounds
    if timeout is not None and not bounds.min_timeout_s <= timeout <= bounds.max_timeout_s:
        raise ValidationFailed.for_field(
            names[0], f"{names[0]} must be between {bounds.min_timeout_s:g} and {bounds.max_timeout_s:g} seconds"
        )
    if memory is not None and not bounds.min_memory_mb <= memory <= bounds.max_memory_mb:
        raise ValidationFailed.for_field(
            names[1], f"{names[1]} must be between {bounds.min_memory_mb} and {bounds.max_memory_mb}"
        )


@bp.post(
    "/execute",
    responses={
        202: JobAccepted,
        400: ErrorResponse,
        401: ErrorResponse,
        404: ErrorResponse,
        415: ErrorResponse,
        422: ErrorResponse,
        429: ErrorResponse,
        503: ErrorResponse,
    },
)
def execute(body: CalculationExecuteBody) -> Response:
    """Submit a calculation job (a script, or a saved script by ``script_id`` and optional ``version``): it runs
    in the sandbox once per symbol; poll the job for progress."""
    svc = services()
    settings = svc.settings
    principal = current_principal()
    script, script_id, script_version = script_source(body)
    check_script_length("script", script)
    symbols = list(dict.fromkeys(body.stock_symbols))
    if body.as_of is not None:
        with svc.session_factory() as session:
            symbols = universes.listed_members(session, symbols, body.as_of)
    if len(symbols) > settings.max_symbols_per_job:
        raise ValidationFailed.for_field(
            "stock_symbols", f"{len(symbols):,} symbols; at most {settings.max_symbols_per_job:,} per job"
        )
    check_sandbox_limits(body.timeout, body.memory_mb, ("timeout", "memory_mb"))
    with svc.session_factory() as session:
        quotas.check_submission(session, principal.user_id, quotas.BUDGET_INTERACTIVE, settings.quotas)
    request = CalculationRequest(
        script=script,
        column_name=body.column_name,
        symbols=symbols,
        start_date=body.start_date,
        end_date=body.end_date,
        timeframe=body.timeframe,
        adjustment=body.adjustment,
        params=body.params,
        owner_id=principal.user_id,
        script_id=script_id,
        script_version=script_version,
        sandbox_timeout_s=body.timeout,
        sandbox_memory_mb=body.memory_mb,
        capture_output=body.capture_output,
        callback_url=(
            webhooks.validate_callback_url(body.callback_url, allow_private=settings.webhooks.allow_private)
            if body.callback_url
            else None
        ),
    )

    def record_submission(session: Session, job: Job) -> None:  # in the job's own transaction
        audit(session, AuditAction.JOB_SUBMITTED, resource_type="job", resource_id=job.id, kind=job.kind,
              script_id=str(script_id) if script_id else None, script_version=script_version,
              symbols=len(symbols))  # fmt: skip

    job = submit_calculation(
        svc.session_factory,
        request,
        shard_size=settings.shard_size,
        enqueue=shard_enqueuer(svc.celery),
        max_active_per_owner=settings.rate_limits.max_active_jobs,
        on_write=record_submission,
        events=RedisJobEvents(svc.redis),
    )
    links = job_links(job.id)
    accepted = JobAccepted(
        job_id=str(job.id), status=job.status, shards=job.shards_total, symbols=job.symbols_total, links=links
    )
    response = jsonify(accepted.model_dump(mode="json"))
    response.status_code = 202
    response.headers["Location"] = links.self
    return response
