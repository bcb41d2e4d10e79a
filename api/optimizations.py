"""Optimisations: ``/api/optimizations`` (create, list), ``/api/optimizations/<id>`` (view, results, cancel,
artifacts).

An optimisation is a job of kind ``optimization`` (``/api/jobs/<id>`` and its events show it as a job too).
Ownership, audit and the error shape are the runs' (someone else's optimisation is a 404; admins may read).
"""

from __future__ import annotations

import hashlib
import io
import logging
import uuid
from typing import Any

from flask import Response, jsonify, request, send_file
from flask_openapi3 import APIBlueprint, Tag
from sqlalchemy import select
from sqlalchemy.orm import Session

from api import BEARER_SECURITY, services
from api.audit import audit
from api.auth import current_principal
from api.jobs import after_cancel
from api.optimization_schemas import (
    OptimizationAccepted,
    OptimizationArtifactPath,
    OptimizationLinks,
    OptimizationPath,
    OptimizationProgress,
    OptimizationResultsPage,
    OptimizationResultsQuery,
    OptimizationsPage,
    OptimizationsQuery,
    OptimizationSummaryItem,
    OptimizationView,
    RankedRowView,
)
from api.schemas import ErrorResponse
from api.views import callback_view
from shared.accounts.access import require_owner, require_read
from shared.accounts.audit import AuditAction
from shared.contract import TASK_RUN_OPTIMIZATION_SHARD, shard_enqueuer
from shared.domain.search.spec import OptimizationSpec
from shared.errors import Conflict, NotFound, ValidationFailed
from shared.infra import pagination
from shared.infra.events import RedisJobEvents
from shared.infra.models import Job, Optimization, RunManifest
from shared.jobs import pipeline as jobs
from shared.jobs import webhooks
from shared.jobs.backtests import artifacts
from shared.jobs.backtests import read as runs
from shared.jobs.optimizations import read, submit
from shared.jobs.optimizations.spec import Limits, OptimizationRequest

log = logging.getLogger(__name__)

bp = APIBlueprint(
    "optimizations",
    __name__,
    url_prefix="/api/optimizations",
    abp_tags=[Tag(name="optimizations")],
    abp_security=BEARER_SECURITY,
)

IDEMPOTENCY_HEADER = "Idempotent-Replayed"
SPEC_FIELDS = ("parameters", "search", "objective", "constraints", "walk_forward")


def _not_found(raw: object) -> NotFound:
    return NotFound(f"optimization {str(raw)[:64]} not found", details={"optimization_id": str(raw)[:64]})


def _id(raw: str) -> uuid.UUID:
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise _not_found(raw) from None


def _readable(session: Session, raw_id: str) -> tuple[Job, Optimization]:
    try:
        job, opt = read.get(session, _id(raw_id))
    except NotFound:
        raise _not_found(raw_id) from None
    require_read(current_principal(), job.owner_id, _not_found(job.id))
    return job, opt


def links(job_id: uuid.UUID) -> OptimizationLinks:
    base = f"/api/optimizations/{job_id}"
    return OptimizationLinks(
        self=base,
        results=f"{base}/results",
        cancel=f"{base}/cancel",
        events=f"/api/jobs/{job_id}/events",
        artifacts=f"{base}/artifacts",
        job=f"/api/jobs/{job_id}",
    )


def spec_from_body(body: dict[str, Any]) -> tuple[OptimizationSpec, str | None]:
    """The spec and the optional name. The backtest part (symbols / symbol / universe, preset, dates, risk,
    execution, ...) is read exactly as ``POST /api/runs`` reads it; ``strategy`` may be a bare name."""
    from api.runs import _config_from_body

    body = dict(body)
    fields = {key: body.pop(key) for key in SPEC_FIELDS if key in body}
    if "parameters" not in fields:
        raise ValidationFailed.for_field("parameters", "the parameters to optimise and their values are required")
    strategy = body.get("strategy")
    if isinstance(strategy, str):
        body["strategy"] = {"name": strategy}
    if body.get("strategy") is None and "preset" not in body:
        raise ValidationFailed.for_field("strategy", "a built-in strategy name (or {name, params}) is required")
    config, name = _config_from_body(body)
    spec = OptimizationSpec.model_validate({"config": config.model_dump(mode="json"), **fields})
    return spec, name


@bp.post(
    "",
    responses={
        200: OptimizationAccepted,
        202: OptimizationAccepted,
        400: ErrorResponse,
        401: ErrorResponse,
        422: ErrorResponse,
        429: ErrorResponse,
        503: ErrorResponse,
    },
)
def create_optimization() -> Response:
    """Create an optimisation: a backtest config as for runs (``strategy``, ``symbol``/``symbols``/``universe``,
    dates, risk, execution, ...) plus ``parameters`` (per parameter a list or ``{start, stop, step}``, stop
    inclusive), ``search`` (``{"method": "grid"}`` or ``{"method": "random", "budget", "seed"}``), ``objective``
    (``{metric, direction}``), ``constraints`` (``[{metric, op, value}]``) and optional ``walk_forward``
    (``{in_sample, out_of_sample, anchored}`` in bars). 202 when new; 200 with ``Idempotent-Replayed: true`` when
    you already have an optimisation of this exact spec."""
    svc = services()
    settings = svc.settings
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise ValidationFailed.for_field("body", "a JSON object with the optimisation spec is required")
    body = dict(body)
    callback_url = body.pop("callback_url", None)  # a webhook when it ends, as for runs (not part of the spec)
    spec, name = spec_from_body(body)
    if callback_url is not None:
        if not isinstance(callback_url, str):
            raise ValidationFailed.for_field("callback_url", "must be an http or https URL")
        webhooks.validate_callback_url(callback_url, allow_private=settings.webhooks.allow_private)
    if len(spec.config.symbols) > settings.max_symbols_per_job:
        raise ValidationFailed.for_field(
            "symbols", f"{len(spec.config.symbols):,} symbols; at most {settings.max_symbols_per_job:,}"
        )

    def record(session: Session, job: Job) -> None:
        audit(
            session,
            AuditAction.JOB_SUBMITTED,
            resource_type="optimization",
            resource_id=job.id,
            strategy=spec.config.strategy.name,
            spec_hash=spec.spec_hash,
            symbols=len(spec.config.symbols),
        )

    submitted = submit.submit(
        svc.session_factory,
        OptimizationRequest(spec=spec, owner_id=current_principal().user_id, name=name, callback_url=callback_url),
        Limits(
            settings.max_grid_combos,
            settings.max_optimization_backtests,
            settings.optimization_slice_backtests,
            max_script_combos=settings.max_script_combos,
            script_slice_combos=settings.script_optimization_slice_combos,
            max_bars=settings.max_portfolio_bars,
        ),
        enqueue=shard_enqueuer(svc.celery, TASK_RUN_OPTIMIZATION_SHARD),
        max_active_per_owner=settings.rate_limits.max_active_jobs,
        on_write=record,
        events=RedisJobEvents(svc.redis),
    )
    job = submitted.job
    accepted = OptimizationAccepted(
        optimization_id=str(job.id),
        status=job.status,
        spec_hash=submitted.record.spec_hash,
        combos=submitted.record.combos,
        shards=job.shards_total,
        links=links(job.id),
    )
    response = jsonify(accepted.model_dump(mode="json"))
    response.status_code = 202 if submitted.created else 200
    response.headers["Location"] = accepted.links.self
    response.headers[IDEMPOTENCY_HEADER] = "false" if submitted.created else "true"
    return response


def _progress(session: Session, job: Job) -> OptimizationProgress:
    done, planned = read.progress_counts(session, job.id)
    return OptimizationProgress(
        shards_total=job.shards_total,
        shards_done=job.shards_done,
        shards_failed=job.shards_failed,
        combos_total=planned,
        combos_done=done,
        percent=round(100.0 * done / planned, 2) if planned else 100.0,
    )


def _view(
    job: Job, opt: Optimization, progress: OptimizationProgress, outcome: dict[str, Any] | None
) -> OptimizationView:
    return OptimizationView(
        optimization_id=str(job.id),
        name=opt.name,
        status=job.status,
        owner_id=opt.owner_id,
        strategy=opt.strategy,
        spec_hash=opt.spec_hash,
        spec=opt.spec,
        data_sha256=job.data_sha256,
        data_version=job.data_version,
        combos=opt.combos,
        progress=progress,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        error=job.error,
        best=(outcome or {}).get("best"),
        combos_passing=(outcome or {}).get("combos_passing"),
        walk_forward=(outcome or {}).get("walk_forward"),
        callback=callback_view(job),
        links=links(job.id),
    )


NEWEST_FIRST: pagination.Keyset[tuple[Job, Optimization]] = pagination.Keyset(
    (Optimization.created_at, Optimization.job_id),
    (pagination.timestamp, pagination.uuid_value),
    lambda row: (row[1].created_at, row[1].job_id),
    descending=True,
)


@bp.get("", responses={200: OptimizationsPage, 401: ErrorResponse, 422: ErrorResponse})
def list_optimizations(query: OptimizationsQuery) -> Response:
    """Your optimisations, newest first; filter by ``status``; keyset-paged (``cursor``)."""
    stmt = select(Job, Optimization).join(Optimization, Optimization.job_id == Job.id)
    stmt = stmt.where(Optimization.owner_id == current_principal().user_id)
    if query.status:
        stmt = stmt.where(Job.status == query.status)
    with services().session_factory() as session:
        rows, next_cursor = pagination.page(
            session, stmt, NEWEST_FIRST, limit=query.limit, cursor=query.cursor, scalars=False
        )
    page = OptimizationsPage(
        optimizations=[
            OptimizationSummaryItem(
                optimization_id=str(job.id),
                name=opt.name,
                status=job.status,
                strategy=opt.strategy,
                spec_hash=opt.spec_hash,
                combos=opt.combos,
                symbols=job.symbols_total,
                created_at=opt.created_at,
                finished_at=job.finished_at,
                links=links(job.id),
            )
            for job, opt in rows
        ],
        next_cursor=next_cursor,
    )
    return jsonify(page.model_dump(mode="json"))


@bp.get("/<optimization_id>", responses={200: OptimizationView, 401: ErrorResponse, 404: ErrorResponse})
def get_optimization(path: OptimizationPath) -> Response:
    """Status and progress (combos scored); once final, the best combo with the full metrics of one
    ``run_backtest`` per symbol, or the walk-forward path and stitched out-of-sample equity. Rows only: a worker
    stored the outcome in the transaction that made the job final (a cancelled one's follows once its last slice
    stops, or the worker task the cancel sends finalizes it)."""
    with services().session_factory() as session:
        job, opt = _readable(session, path.optimization_id)
        progress = _progress(session, job)
        view = _view(job, opt, progress, opt.outcome)
    return jsonify(view.model_dump(mode="json"))


@bp.get(
    "/<optimization_id>/results",
    responses={200: OptimizationResultsPage, 404: ErrorResponse, 422: ErrorResponse},
)
def get_results(path: OptimizationPath, query: OptimizationResultsQuery) -> Response:
    """The ranked table: combos passing every constraint, best first (ties: lower combo index; an undefined
    objective last), keyset-paged (``cursor``); ``include_filtered=true`` lists the filtered-out rows after them,
    each with the constraints it fails. ``window`` picks a walk-forward window's in-sample table."""
    with services().session_factory() as session:
        job, opt = _readable(session, path.optimization_id)
        spec = OptimizationSpec.model_validate(opt.spec)
        rows, passing, total, next_cursor = read.ranked_page(
            session,
            job.id,
            spec,
            window=query.window,
            cursor=query.cursor,
            limit=query.limit,
            include_filtered=query.include_filtered,
        )
    page = OptimizationResultsPage(
        optimization_id=str(job.id),
        status=job.status,
        objective=spec.objective.model_dump(),
        constraints=[c.model_dump() for c in spec.constraints],
        window=query.window,
        passing=passing,
        total=total,
        results=[RankedRowView.model_validate(vars(r)) for r in rows],
        next_cursor=next_cursor,
    )
    return jsonify(page.model_dump(mode="json"))


@bp.post("/<optimization_id>/cancel", responses={200: OptimizationView, 404: ErrorResponse, 409: ErrorResponse})
def cancel_optimization(path: OptimizationPath) -> Response:
    """Cancel a queued or running optimisation: queued slices are revoked, running ones stop at their next
    checkpoint keeping the combos scored. A finished one is a 409."""
    svc = services()
    job_id = _id(path.optimization_id)
    with svc.session_factory() as session:
        try:
            job, _ = read.get(session, job_id)
        except NotFound:
            raise _not_found(job_id) from None
        owner_id, status = job.owner_id, job.status
    require_owner(current_principal(), owner_id, _not_found(job_id))
    if status in runs.FINAL_STATUSES:
        raise Conflict(
            f"optimization {job_id} has already finished ({status})",
            details={"optimization_id": str(job_id), "status": status},
        )

    def record(session: Session, cancelled: Job) -> None:
        audit(session, AuditAction.JOB_CANCELLED, resource_type="optimization", resource_id=cancelled.id)

    job, task_ids = jobs.cancel_job(svc.session_factory, job_id, on_write=record, events=RedisJobEvents(svc.redis))
    # Revoke; with no slice running (none will finish to do it): a worker finalizes it (outcome, then artifacts), and
    # the webhook.
    after_cancel(svc, job, task_ids)
    if job.status != "cancelled":
        raise Conflict(
            f"optimization {job_id} has already finished ({job.status})",
            details={"optimization_id": str(job_id), "status": job.status},
        )
    with svc.session_factory() as session:
        job, opt = read.get(session, job_id)
        progress = _progress(session, job)
    return jsonify(_view(job, opt, progress, None).model_dump(mode="json"))


# --- artifacts (the runs' manifest chain and store: shared.jobs.backtests.artifacts) -----------------------------


def _manifest(raw_id: str) -> tuple[Job, RunManifest]:
    with services().session_factory() as session:
        job, _ = _readable(session, raw_id)
        manifest = artifacts.get_manifest(session, job.id)
    if manifest is None:  # pending: written by a worker once the job is finalized; missing if its finalization failed
        artifacts_state = "missing" if job.finalize_error is not None else "pending"
        raise Conflict(
            f"optimization {job.id} has no artifacts yet",
            details={"optimization_id": str(job.id), "status": job.status, "artifacts": artifacts_state},
        )
    return job, manifest


@bp.get("/<optimization_id>/artifacts", responses={200: None, 404: ErrorResponse, 409: ErrorResponse})
def list_artifacts(path: OptimizationPath) -> Response:
    """The files (``optimization.json``, ``results.csv``, ``heatmap.png`` for two parameters) with sizes and
    SHA-256 from the manifest, which is chained to your previous manifest (runs' and optimisations' alike)."""
    job, manifest = _manifest(path.optimization_id)
    base = f"/api/optimizations/{job.id}/artifacts"
    files = [
        {
            **f,
            "media_type": artifacts.MEDIA_TYPES.get(f["name"], "application/octet-stream"),
            "url": f"{base}/{f['name']}",
        }
        for f in manifest.manifest["files"]
    ]
    return jsonify(
        {
            "optimization_id": str(job.id),
            "status": "ready",
            "manifest_sha256": manifest.manifest_sha256,
            "chain_prev": manifest.chain_prev,
            "files": files,
            "manifest_url": f"{base}/{artifacts.MANIFEST_NAME}",
        }
    )


@bp.get("/<optimization_id>/artifacts/<name>", responses={200: None, 404: ErrorResponse, 409: ErrorResponse})
def get_artifact(path: OptimizationArtifactPath) -> Response:
    _, manifest = _manifest(path.optimization_id)
    content = artifacts.read_artifact(services().artifacts, manifest, path.name)
    media_type = artifacts.MEDIA_TYPES.get(path.name, "application/octet-stream")
    etag = hashlib.sha256(content).hexdigest()
    return send_file(io.BytesIO(content), mimetype=media_type, download_name=path.name, etag=etag, max_age=0)


@bp.get("/<optimization_id>/manifest/verify", responses={200: None, 404: ErrorResponse, 409: ErrorResponse})
def verify_manifest(path: OptimizationPath) -> Response:
    """Recompute every file's size and SHA-256, the manifest's hash and its link in your manifest chain."""
    _, manifest = _manifest(path.optimization_id)
    with services().session_factory() as session:
        return jsonify(artifacts.verify(session, services().artifacts, manifest))
