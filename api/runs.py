"""Backtest runs: ``/api/runs`` (create, list), ``/api/runs/<run_id>`` (view, results, cancel).

A run is a job of kind ``backtest``: ``/api/jobs/<run_id>`` shows it as a job too. Ownership, audit and the
error shape are the calculation endpoints' (someone else's run is a 404; admins may read, not cancel).

Views only read rows (``shared.jobs.backtests.read``): a run's portfolio and validation result are stored by the
worker that finalizes it (``shared.jobs.backtests.finalize``), in the transaction that makes it final.
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from flask import Response, jsonify, request
from flask_openapi3 import APIBlueprint, Tag
from sqlalchemy import select
from sqlalchemy.orm import Session

from api import BEARER_SECURITY, services
from api.audit import audit
from api.auth import current_principal
from api.jobs import after_cancel
from api.run_schemas import (
    RunAccepted,
    RunLinks,
    RunPath,
    RunProgress,
    RunResultRow,
    RunResultsPage,
    RunResultsQuery,
    RunsPage,
    RunsQuery,
    RunSummaryItem,
    RunValidation,
    RunView,
    SymbolSummary,
    ValidationBody,
    ValidationProgress,
)
from api.schemas import ErrorResponse
from api.views import callback_view, progress
from shared.accounts.access import require_owner, require_read
from shared.accounts.audit import AuditAction
from shared.contract import TASK_RUN_BACKTEST_SHARD, shard_enqueuer
from shared.domain.backtest import BacktestConfig
from shared.domain.robustness import ValidationSpec
from shared.errors import Conflict, NotFound, ValidationFailed
from shared.infra import pagination
from shared.infra.events import RedisJobEvents
from shared.infra.models import BacktestRun, Job, JobResult
from shared.jobs import pipeline as jobs
from shared.jobs import webhooks
from shared.jobs.backtests import read as runs
from shared.jobs.backtests import submit as run_submit
from shared.library import strategy_scripts

bp = APIBlueprint("runs", __name__, url_prefix="/api/runs", abp_tags=[Tag(name="runs")], abp_security=BEARER_SECURITY)

SYMBOLS_IN_VIEW = 100
"""GET /api/runs/<id> embeds at most this many symbol summaries (every symbol: /api/runs/<id>/results, paged)."""

IDEMPOTENCY_HEADER = "Idempotent-Replayed"
"""``true`` on a create that found the caller's existing run of the same config (200 instead of 202)."""


def _not_found(raw: object) -> NotFound:
    return NotFound(f"run {str(raw)[:64]} not found", details={"run_id": str(raw)[:64]})


def _run_id(raw: str) -> uuid.UUID:
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise _not_found(raw) from None


def _readable_run(session: Session, raw_id: str) -> tuple[Job, BacktestRun]:
    job, run = runs.get_run(session, _run_id(raw_id))
    require_read(current_principal(), job.owner_id, _not_found(job.id))
    return job, run


def run_links(run_id: uuid.UUID) -> RunLinks:
    base = f"/api/runs/{run_id}"
    return RunLinks(
        self=base,
        results=f"{base}/results",
        cancel=f"{base}/cancel",
        events=f"{base}/events",
        artifacts=f"{base}/artifacts",
        job=f"/api/jobs/{run_id}",
    )


def _symbol_summary(row: JobResult) -> SymbolSummary:
    metrics: dict[str, Any] = (row.data or {}).get("metrics") or {}
    picked = {name: metrics.get(key) for name, key in runs.SUMMARY_METRICS.items()}
    return SymbolSummary.model_validate({"symbol": row.symbol, **picked, "error": row.error})


def run_progress(job: Job, validation: runs.ValidationProgress | None) -> RunProgress:
    """The job's progress, with the run's validation tasks; ``percent`` weighs symbols and validation work in
    backtests (one per symbol, ``Task.work`` per task)."""
    base = progress(job).model_dump()
    if validation is None:
        return RunProgress(**base)
    total = job.symbols_total + validation.work_total
    done = job.symbols_done + validation.work_done
    base["percent"] = round(100.0 * done / total, 2) if total else 100.0
    return RunProgress(**base, validation=ValidationProgress(**vars(validation)))


def _validation_progress(session: Session, runs_: list[BacktestRun]) -> dict[uuid.UUID, runs.ValidationProgress]:
    ids = [r.job_id for r in runs_ if r.validation is not None]
    return runs.validation_progress(session, ids) if ids else {}


def _validation_view(run: BacktestRun, result: dict[str, Any] | None) -> RunValidation | None:
    if run.validation is None:
        return None
    return RunValidation(spec=run.validation, seed=int(run.config.get("seed", 0)), result=result)


def run_view(
    job: Job, run: BacktestRun, results: list[JobResult], validation: runs.ValidationProgress | None = None
) -> RunView:
    """The run as stored: its portfolio and validation result are the rows its finalization wrote (None until the
    run is finalized, and for a one-symbol run's portfolio)."""
    return RunView(
        run_id=str(job.id),
        name=run.name,
        status=job.status,
        owner_id=run.owner_id,
        strategy=run.strategy,
        config_hash=run.config_hash,
        config=run.config,
        data_sha256=job.data_sha256,
        data_version=job.data_version,
        progress=run_progress(job, validation),
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        error=job.error,
        symbols=[_symbol_summary(r) for r in results[:SYMBOLS_IN_VIEW]],
        symbols_truncated=len(results) > SYMBOLS_IN_VIEW,
        portfolio=run.portfolio,
        validation=_validation_view(run, run.validation_result),
        callback=callback_view(job),
        links=run_links(job.id),
    )


def _config_from_body(body: dict[str, Any]) -> tuple[BacktestConfig, str | None]:
    """The engine's config and the optional run name. The symbols come as exactly one of ``symbols``, ``symbol``
    (one symbol) or ``universe`` (the id or name of a saved universe of yours, resolved to its symbols now; its
    ``timeframe`` is the run's unless the body gives one). With
    ``preset`` (id or name of a preset of yours) the rest of the body is laid over the preset's config
    (``shared.library.presets.merge_overrides``). With ``as_of`` (an ISO date) only the symbols listed on that day
    are kept (free of survivorship bias: delisted ones included, later listings not). The config holds the resolved
    symbols and settings, so idempotency works on what runs. Invalid fields raise pydantic's ValidationError: a 422
    naming each field."""
    from shared.library import presets, universes

    body = dict(body)
    name = body.pop("name", None)
    as_of = _as_of(body.pop("as_of", None))
    if name is not None and (not isinstance(name, str) or not name.strip() or len(name) > 100):
        raise ValidationFailed.for_field("name", "must be a non-blank string of at most 100 characters")
    given = [key for key in ("symbol", "symbols", "universe") if key in body]
    if len(given) > 1:
        field = "symbol" if given[:2] == ["symbol", "symbols"] else "universe"
        raise ValidationFailed.for_field(field, f"send exactly one of symbol, symbols or universe, not {given}")
    if "symbol" in body:
        symbol = body.pop("symbol")
        if not isinstance(symbol, str):
            raise ValidationFailed.for_field("symbol", "must be a string")
        body["symbols"] = [symbol]
    elif "symbols" not in body and "universe" not in body:
        raise ValidationFailed.for_field(
            "symbols", "a list of symbols (or one symbol as symbol, or a saved universe as universe) is required"
        )
    if "universe" in body or "preset" in body:
        owner_id = current_principal().user_id
        with services().session_factory() as session:
            if "universe" in body:
                universe = universes.find_for_run(session, owner_id, body.pop("universe"))
                body["symbols"] = list(universe.symbols)
                body.setdefault("timeframe", universe.timeframe)  # the universe's, unless the body says
            if "preset" in body:
                base = presets.resolve_for_run(session, owner_id, body.pop("preset"))
                body = presets.merge_overrides(base, body)
    if as_of is not None and isinstance(body.get("symbols"), list):
        with services().session_factory() as session:
            body["symbols"] = universes.listed_members(session, body["symbols"], as_of)
    _check_date_order(body)
    config = BacktestConfig.model_validate(body)
    return config, (name.strip() if name else None)


def _validation_from_body(raw: object) -> ValidationSpec | None:
    """The body's ``validation`` (absent or null: none). Invalid fields raise pydantic's ValidationError located
    under ``validation`` (``validation.permutation.n``): a 422 naming each field."""
    if raw is None:
        return None
    spec = ValidationBody.model_validate({"validation": raw}).validation
    return spec if spec.methods() else None


def _as_of(raw: object) -> dt.date | None:
    """The body's ``as_of`` (absent or null: none); anything but an ISO date is a 422 naming it."""
    if raw is None:
        return None
    if isinstance(raw, str) and len(raw) == 10:
        try:
            return dt.date.fromisoformat(raw)
        except ValueError:
            pass
    raise ValidationFailed.for_field("as_of", f"must be an ISO date (YYYY-MM-DD), got {str(raw)[:40]!r}")


def _check_date_order(body: dict[str, Any]) -> None:
    """The engine reports an inverted range on the whole config; the API names the field."""
    start, end = body.get("start_date"), body.get("end_date")
    if not (isinstance(start, str) and isinstance(end, str)):
        return
    try:
        inverted = dt.date.fromisoformat(start) > dt.date.fromisoformat(end)
    except ValueError:
        return  # the config's validation names the malformed date
    if inverted:
        raise ValidationFailed.for_field("end_date", f"the date range is empty: end_date {end} is before {start}")


@bp.post(
    "",
    responses={
        200: RunAccepted,
        202: RunAccepted,
        400: ErrorResponse,
        401: ErrorResponse,
        415: ErrorResponse,
        422: ErrorResponse,
        429: ErrorResponse,
        503: ErrorResponse,
    },
)
def create_run() -> Response:
    """Create a backtest run from a config (the engine's schema; ``symbol`` or ``symbols``, optional ``name``).
    202 for a new run; 200 with ``Idempotent-Replayed: true`` when you already have a run of this config."""
    svc = services()
    settings = svc.settings
    principal = current_principal()
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise ValidationFailed.for_field("body", "a JSON object with the backtest config is required")
    callback_url = body.pop("callback_url", None)  # a webhook when the run ends, as for calculation jobs
    validation = _validation_from_body(body.pop("validation", None))
    config, name = _config_from_body(body)
    with svc.session_factory() as session:  # a script strategy: the owner's script, version pinned, params checked
        config, strategy_code = strategy_scripts.pin_for_run(session, principal.user_id, config)
    if callback_url is not None:
        if not isinstance(callback_url, str):
            raise ValidationFailed.for_field("callback_url", "must be an http or https URL")
        webhooks.validate_callback_url(callback_url, allow_private=settings.webhooks.allow_private)
    if len(config.symbols) > settings.max_symbols_per_job:
        raise ValidationFailed.for_field(
            "symbols", f"{len(config.symbols):,} symbols; at most {settings.max_symbols_per_job:,} per run"
        )

    def record_submission(session: Session, job: Job) -> None:  # in the run's own transaction
        audit(session, AuditAction.RUN_SUBMITTED, resource_type="run", resource_id=job.id,
              strategy=config.strategy.name, config_hash=config.config_hash, symbols=len(config.symbols))  # fmt: skip

    submitted = run_submit.submit_run(
        svc.session_factory,
        run_submit.RunRequest(
            config=config,
            owner_id=principal.user_id,
            name=name,
            callback_url=callback_url,
            validation=validation,
            strategy_code=strategy_code,
        ),
        shard_size=settings.shard_size,
        enqueue=shard_enqueuer(svc.celery, TASK_RUN_BACKTEST_SHARD),
        max_active_per_owner=settings.rate_limits.max_active_jobs,
        on_write=record_submission,
        events=RedisJobEvents(svc.redis),
        validation_limits=run_submit.ValidationLimits(
            settings.max_validation_backtests,
            settings.max_validation_task_backtests,
            settings.max_script_validation_backtests,
            settings.max_portfolio_bars,
        ),
    )
    job = submitted.job
    links = run_links(job.id)
    accepted = RunAccepted(
        run_id=str(job.id),
        status=job.status,
        config_hash=submitted.record.config_hash,
        shards=job.shards_total,
        symbols=job.symbols_total,
        links=links,
    )
    response = jsonify(accepted.model_dump(mode="json"))
    response.status_code = 202 if submitted.created else 200
    response.headers["Location"] = links.self
    response.headers[IDEMPOTENCY_HEADER] = "false" if submitted.created else "true"
    return response


NEWEST_FIRST: pagination.Keyset[tuple[Job, BacktestRun]] = pagination.Keyset(
    (BacktestRun.created_at, BacktestRun.job_id),
    (pagination.timestamp, pagination.uuid_value),
    lambda row: (row[1].created_at, row[1].job_id),
    descending=True,
)


@bp.get("", responses={200: RunsPage, 401: ErrorResponse, 422: ErrorResponse})
def list_runs(query: RunsQuery) -> Response:
    """Your runs, newest first, keyset-paged; filter by ``status`` and ``strategy``."""
    principal = current_principal()
    stmt = select(Job, BacktestRun).join(BacktestRun, BacktestRun.job_id == Job.id)
    stmt = stmt.where(BacktestRun.owner_id == principal.user_id)
    if query.status:
        stmt = stmt.where(Job.status == query.status)
    if query.strategy:
        stmt = stmt.where(BacktestRun.strategy == query.strategy)
    with services().session_factory() as session:
        rows, next_cursor = pagination.page(
            session, stmt, NEWEST_FIRST, limit=query.limit, cursor=query.cursor, scalars=False
        )
        validating = _validation_progress(session, [run for _, run in rows])
    page = RunsPage(
        runs=[
            RunSummaryItem(
                run_id=str(job.id),
                name=run.name,
                status=job.status,
                strategy=run.strategy,
                config_hash=run.config_hash,
                symbols=job.symbols_total,
                progress=run_progress(job, validating.get(job.id)),
                created_at=run.created_at,
                finished_at=job.finished_at,
                links=run_links(job.id),
            )
            for job, run in rows
        ],
        next_cursor=next_cursor,
    )
    return jsonify(page.model_dump(mode="json"))


@bp.get("/<run_id>", responses={200: RunView, 401: ErrorResponse, 404: ErrorResponse})
def get_run(path: RunPath) -> Response:
    """Status, progress (validation tasks included), a metrics summary per finished symbol (the first
    100; every one: ``/results``), for a finished run of several symbols portfolio-level metrics, and with a
    validation spec its result: both from the moment the run reads final (a run cancelled while shards ran: once
    they have stopped, within a checkpoint)."""
    with services().session_factory() as session:
        job, run = _readable_run(session, path.run_id)
        results = _summary_rows(session, job.id)
        validating = _validation_progress(session, [run]).get(job.id)
    return jsonify(run_view(job, run, results, validating).model_dump(mode="json"))


def _summary_rows(session: Session, job_id: uuid.UUID) -> list[JobResult]:
    """The first symbols' results, one more than shown (to tell that the list was cut)."""
    query = select(JobResult).where(JobResult.job_id == job_id).order_by(JobResult.symbol).limit(SYMBOLS_IN_VIEW + 1)
    return list(session.scalars(query))


@bp.get("/<run_id>/results", responses={200: RunResultsPage, 404: ErrorResponse, 422: ErrorResponse})
def get_results(path: RunPath, query: RunResultsQuery) -> Response:
    """Every metric of each finished symbol (or its error), ordered by symbol, keyset-paged with ``cursor``."""
    with services().session_factory() as session:
        job, _ = _readable_run(session, path.run_id)
        rows, next_cursor = jobs.page_results(session, job.id, limit=query.limit, cursor=query.cursor)
    page = RunResultsPage(
        run_id=str(job.id),
        status=job.status,
        results=[
            RunResultRow(
                symbol=r.symbol,
                metrics=(r.data or {}).get("metrics"),
                orders=(r.data or {}).get("orders"),
                error=r.error,
            )
            for r in rows
        ],
        next_cursor=next_cursor,
    )
    return jsonify(page.model_dump(mode="json"))


@bp.post("/<run_id>/cancel", responses={200: RunView, 404: ErrorResponse, 409: ErrorResponse})
def cancel_run(path: RunPath) -> Response:
    """Cancel a queued or running run: queued shards are revoked, running ones stop at their next checkpoint,
    finished symbols are kept. A run that has already finished is a 409."""
    svc = services()
    run_id = _run_id(path.run_id)
    with svc.session_factory() as session:
        job, _ = runs.get_run(session, run_id)
        owner_id, status = job.owner_id, job.status
    require_owner(current_principal(), owner_id, _not_found(run_id))
    if status in runs.FINAL_STATUSES:
        details = {"run_id": str(run_id), "status": status}
        raise Conflict(f"run {run_id} has already finished ({status})", details=details)

    def record_cancellation(session: Session, cancelled: Job) -> None:  # in the cancelling transaction
        audit(session, AuditAction.RUN_CANCELLED, resource_type="run", resource_id=cancelled.id)

    job, task_ids = jobs.cancel_job(
        svc.session_factory, run_id, on_write=record_cancellation, events=RedisJobEvents(svc.redis)
    )
    after_cancel(svc, job, task_ids)
    if job.status != "cancelled":  # it finished between the read and the cancel
        raise Conflict(
            f"run {run_id} has already finished ({job.status})", details={"run_id": str(run_id), "status": job.status}
        )
    with svc.session_factory() as session:
        job, run = runs.get_run(session, run_id)
        results = _summary_rows(session, job.id)
        validating = _validation_progress(session, [run]).get(job.id)
    return jsonify(run_view(job, run, results, validating).model_dump(mode="json"))
