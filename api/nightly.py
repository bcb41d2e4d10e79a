"""Nightly recalculation: a script's latest nightly values (``GET /api/custom-calculations/scripts/<id>/latest``)
and the operators' on-demand run (``POST /api/nightly-runs``)."""

from __future__ import annotations

from typing import Any

from flask import Response, jsonify
from flask_openapi3 import APIBlueprint, Tag
from pydantic import BaseModel

from api import BEARER_SECURITY, services
from api.account_schemas import ScriptPath
from api.auth import current_principal
from api.schemas import ErrorResponse
from shared.contract import shard_enqueuer
from shared.errors import Conflict, Forbidden
from shared.infra.config import QUEUE_BULK
from shared.jobs import nightly
from shared.library import scripts

latest_bp = APIBlueprint(
    "script_latest",
    __name__,
    url_prefix="/api/custom-calculations/scripts",
    abp_tags=[Tag(name="scripts")],
    abp_security=BEARER_SECURITY,
)
runs_bp = APIBlueprint(
    "nightly_runs", __name__, url_prefix="/api/nightly-runs", abp_tags=[Tag(name="operations")],
    abp_security=BEARER_SECURITY,
)  # fmt: skip


class LatestValue(BaseModel):
    symbol: str
    value: float | None
    error: dict[str, Any] | None
    script_version: int
    job_id: str
    computed_at: str


class LatestValues(BaseModel):
    script_id: str
    name: str
    nightly: bool
    values: list[LatestValue]
    cached: bool


class NightlyRunStarted(BaseModel):
    run_id: str
    jobs: int
    errors: list[dict[str, Any]]


@latest_bp.get("/<script_id>/latest", responses={200: LatestValues, 404: ErrorResponse})
def latest(path: ScriptPath) -> Response:
    """The newest nightly value (or per-symbol error) of a saved script for every symbol, in one call (served from
    Redis; refreshed when a nightly job of the script finishes)."""
    svc = services()
    with svc.session_factory() as session:
        script = scripts.get_script(session, current_principal(), path.script_id)
        values, cached = nightly.latest_values(session, svc.redis, script.id)
        view = {"script_id": str(script.id), "name": script.name, "nightly": script.nightly, "values": values,
                "cached": cached}  # fmt: skip
    return jsonify(view)


@runs_bp.post("", responses={202: NightlyRunStarted, 403: ErrorResponse, 409: ErrorResponse})
def start_run() -> Response:
    """Operators (admins) start the nightly recalculation now; 409 while the previous run is still going."""
    principal = current_principal()
    if not principal.is_admin:
        raise Forbidden("only operators (admins) may start a nightly run")
    svc = services()
    started = nightly.start_run(
        svc.session_factory,
        trigger="manual",
        requested_by=principal.user_id,
        enqueue=shard_enqueuer(svc.celery, queue=QUEUE_BULK),
        shard_size=svc.settings.shard_size,
    )
    if started.run_id is None:
        raise Conflict("the previous nightly run is still going", details={"running_run_id": str(started.running_id)})
    response = jsonify(
        NightlyRunStarted(run_id=str(started.run_id), jobs=started.jobs, errors=started.errors).model_dump()
    )
    response.status_code = 202
    return response
