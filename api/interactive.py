"""Interactive runs and the sandbox's contract: ``POST /api/custom-calculations/try``, ``POST /api/security/execute``,
``GET /api/security/limits`` and ``GET /api/security/health``.

A run is written as a job (shared/jobs/interactive/), enqueued on the sandbox queue every worker takes before any
shard, and waited for up to ``ALPHAFORGE_INTERACTIVE_WAIT`` seconds: then the answer (200), or 202 with the job to
poll (its result row holds the same answer: ``GET /api/jobs/<id>/results``). A script that does not compile is
answered at once, with no job and no sandbox run.
"""

from __future__ import annotations

from typing import Any

from flask import Response, jsonify
from flask_openapi3 import APIBlueprint, Tag
from sqlalchemy import select

from api import BEARER_SECURITY, services
from api.auth import current_principal
from api.calculations import check_sandbox_limits, check_script_length, script_source
from api.health import checker
from api.interactive_schemas import (
    Bounds,
    ExecuteAnswer,
    ExecuteBody,
    LimitsView,
    SandboxHealth,
    ScriptError,
    StillRunning,
    TryAnswer,
    TryBody,
)
from api.schemas import ErrorResponse
from api.views import job_links
from shared.accounts import quotas
from shared.contract import TASK_RUN_INTERACTIVE, shard_enqueuer
from shared.errors import ScriptCompileError
from shared.infra.config import QUEUE_SANDBOX
from shared.infra.events import RedisJobEvents
from shared.infra.models import Job, JobResult
from shared.jobs import interactive
from shared.jobs.calculations import check_script

bp = APIBlueprint("interactive", __name__, url_prefix="/api", abp_tags=[Tag(name="sandbox")],
                  abp_security=BEARER_SECURITY)  # fmt: skip

_RESPONSES: dict[str | int, Any] = {
    202: StillRunning, 401: ErrorResponse, 404: ErrorResponse, 415: ErrorResponse, 422: ErrorResponse,
    429: ErrorResponse, 503: ErrorResponse,
}  # fmt: skip


def _limits(timeout: float | None, memory: int | None, names: tuple[str, str]) -> tuple[float, int]:
    """The run's limits: its own, or the interactive defaults, inside the operator's bounds."""
    bounds = services().settings.sandbox_bounds
    timeout = bounds.execute_timeout_s if timeout is None else timeout
    memory = bounds.execute_memory_mb if memory is None else memory
    check_sandbox_limits(timeout, memory, names)
    return timeout, memory


def _run(request: interactive.InteractiveRequest, answer: Any) -> Response:
    """Write and enqueue the run, wait for it within the bound, answer it (200) or point at the job (202)."""
    svc = services()
    with svc.session_factory() as session:
        quotas.check_submission(session, request.owner_id, quotas.BUDGET_INTERACTIVE, svc.settings.quotas)
    job = interactive.submit_interactive(svc.session_factory, request,
                                         enqueue=shard_enqueuer(svc.celery, TASK_RUN_INTERACTIVE, QUEUE_SANDBOX),
                                         events=RedisJobEvents(svc.redis))  # fmt: skip
    if interactive.wait_final(svc.session_factory, job.id, svc.settings.sandbox_bounds.interactive_wait_s):
        with svc.session_factory() as session:
            ended = session.get(Job, job.id)
            assert ended is not None
            row = session.scalar(select(JobResult).where(JobResult.job_id == job.id))
            return jsonify(answer(ended, row))
    links = job_links(job.id)
    response = jsonify(StillRunning(job_id=str(job.id), status="running", links=links).model_dump(mode="json"))
    response.status_code = 202
    response.headers["Location"] = links.self
    return response


@bp.post("/custom-calculations/try", responses={200: TryAnswer, **_RESPONSES})
def try_script(body: TryBody) -> Response:
    """Run a calculation script on one symbol, in the same sandbox as jobs: its value or its error (type, message,
    line), what it printed (bounded, truncation marked), execution time and peak memory."""
    script, script_id, script_version = script_source(body)
    check_script_length("script", script)
    timeout, memory = _limits(body.timeout, body.memory_mb, ("timeout", "memory_mb"))
    principal = current_principal()
    try:
        check_script(services().session_factory, script, owner_id=principal.user_id)
    except ScriptCompileError as exc:
        error = ScriptError(type="CompileError", message=exc.reason, line=exc.line)
        return jsonify(TryAnswer(job_id=None, status="failed", symbol=body.symbol, value=None, error=error, output="",
                                 output_truncated=False, output_dropped=0, execution_time=None,
                                 memory_used_mb=None).model_dump(mode="json"))  # fmt: skip
    request = interactive.InteractiveRequest(
        mode=interactive.MODE_TRY, script=script, timeout_s=timeout, memory_mb=memory, owner_id=principal.user_id,
        symbol=body.symbol, params=body.params, start_date=body.start_date, end_date=body.end_date,
        timeframe=body.timeframe, adjustment=body.adjustment, script_id=script_id, script_version=script_version,
    )  # fmt: skip
    return _run(request, interactive.try_answer)


@bp.post("/security/execute", responses={200: ExecuteAnswer, **_RESPONSES})
def execute_code(body: ExecuteBody) -> Response:
    """Execute a snippet in the sandbox (RestrictedPython, a confined process; no bars): success, stdout, stderr,
    error type and message, execution time, memory used, and with ``return_locals`` its top-level names."""
    check_script_length("code", body.code)
    timeout, memory = _limits(body.timeout, body.max_memory_mb, ("timeout", "max_memory_mb"))
    principal = current_principal()
    try:
        check_script(services().session_factory, body.code, owner_id=principal.user_id)
    except ScriptCompileError as exc:
        where = f"line {exc.line}: " if exc.line else ""
        return jsonify(ExecuteAnswer(job_id=None, success=False, stdout="", stderr=f"{where}{exc.reason}\n",
                                     error_type="CompileError", error_message=exc.reason, execution_time=None,
                                     memory_used_mb=None).model_dump(mode="json", exclude_none=False))  # fmt: skip
    request = interactive.InteractiveRequest(
        mode=interactive.MODE_EXECUTE, script=body.code, timeout_s=timeout, memory_mb=memory,
        owner_id=principal.user_id, return_locals=body.return_locals,
    )  # fmt: skip
    return _run(request, interactive.execute_answer)


@bp.get("/security/limits", responses={200: LimitsView, 401: ErrorResponse})
def limits() -> Response:
    """Min, max and default of every limit a run or a job may ask for, and the output bounds."""
    current_principal()
    settings = services().settings
    bounds, sandbox = settings.sandbox_bounds, settings.sandbox
    timeouts, memories = (bounds.min_timeout_s, bounds.max_timeout_s), (bounds.min_memory_mb, bounds.max_memory_mb)
    view = LimitsView(
        timeout=Bounds(min=timeouts[0], max=timeouts[1], default=bounds.execute_timeout_s),
        max_memory_mb=Bounds(min=memories[0], max=memories[1], default=bounds.execute_memory_mb),
        job_timeout=Bounds(min=timeouts[0], max=timeouts[1], default=sandbox.symbol_timeout_s),
        job_memory_mb=Bounds(min=memories[0], max=memories[1], default=sandbox.memory_mb),
        output_chars_per_symbol=sandbox.max_output_chars,
        output_chars_per_job=bounds.job_output_chars,
        interactive_wait_s=bounds.interactive_wait_s,
    )
    return jsonify(view.model_dump(mode="json"))


@bp.get("/security/health", responses={200: SandboxHealth, 401: ErrorResponse, 503: SandboxHealth})
def sandbox_health() -> Response:
    """Which sandbox layers each live worker applies: "ok" when every worker applies every layer, "degraded" when
    one lacks a layer, "unavailable" (503) when no worker answers."""
    current_principal()
    sandbox = checker().report()["sandbox"]
    workers = sandbox.get("workers") or {}
    status = "ok" if sandbox.get("ok") else ("degraded" if workers else "unavailable")
    view = SandboxHealth(status=status, workers=workers, inactive=list(sandbox.get("inactive") or []))
    response = jsonify(view.model_dump(mode="json"))
    response.status_code = 503 if status == "unavailable" else 200
    return response
