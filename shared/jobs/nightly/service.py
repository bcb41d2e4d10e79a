"""Nightly recalculation of saved scripts flagged ``nightly``, and their latest values for screeners.

A run submits every flagged script over its universe as an ordinary calculation job of the script's owner, on the
bulk queue (shared/jobs/fairness.py: interactive work goes first). While a run is not finished no second one starts,
whoever asks (a beat tick, an operator): a transaction-scoped advisory lock serializes the check and the insert of
the run row, and the run row blocks until every one of its jobs finished and was harvested. (celery-redbeat's lock
already keeps a second beat process from firing; this also covers an operator's trigger and a slow run.)

Harvesting copies a finished nightly job's per-symbol results into ``script_latest_values`` (newest wins) and drops
the script's cached copy in Redis, so ``GET /api/custom-calculations/scripts/<id>/latest`` reads one key.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import uuid
from dataclasses import dataclass, field
from typing import Any

import redis
from sqlalchemy import func, select, text, update
from sqlalchemy.orm import Session, sessionmaker

from shared.errors import AppError
from shared.infra.config import QUEUE_BULK
from shared.infra.db import session_scope
from shared.infra.models import Job, JobStatus, NightlyRun, NightlyRunJob, Script, ScriptLatestValue, User
from shared.jobs import pipeline as jobs
from shared.jobs.calculations import service as calculations
from shared.jobs.calculations.service import CalculationRequest

log = logging.getLogger(__name__)

SUBMISSION_DEADLINE = dt.timedelta(hours=1)  # a run still submitting after this died mid-way (its process was killed)
CACHE_TTL_S = 24 * 3600
_FINISHED = (JobStatus.SUCCEEDED.value, JobStatus.PARTIAL.value, JobStatus.FAILED.value, JobStatus.CANCELLED.value)


@dataclass
class RunStart:
    """What asking for a run did: started ``run_id`` (with ``jobs`` submitted), or nothing because ``running_id``
    is still going."""

    run_id: uuid.UUID | None = None
    running_id: uuid.UUID | None = None
    jobs: int = 0
    errors: list[dict[str, Any]] = field(default_factory=list)


def _claim_run(session: Session, trigger: str, requested_by: str | None) -> RunStart:
    session.execute(select(func.pg_advisory_xact_lock(func.hashtextextended("alphaforge-nightly-run", 0))))
    current = session.scalars(
        select(NightlyRun).where(NightlyRun.status == "running").order_by(NightlyRun.created_at.desc())
    ).first()
    if current is not None:
        now = session.scalar(select(func.now()))
        assert now is not None
        if current.submitted_at is not None or now - current.created_at < SUBMISSION_DEADLINE:
            return RunStart(running_id=current.id)
        current.status = "finished"  # its submitting process died: let the next run start
        current.finished_at = now
        current.errors = [*current.errors, {"error": "submission was interrupted"}]
    run = NightlyRun(trigger=trigger, requested_by=requested_by, status="running", errors=[])
    session.add(run)
    session.flush()
    return RunStart(run_id=run.id)


def start_run(
    factory: sessionmaker[Session],
    *,
    trigger: str,
    enqueue: jobs.Enqueue,
    shard_size: int,
    requested_by: str | None = None,
) -> RunStart:
    """Start a nightly run unless one is still going. Scripts of disabled accounts are left out; a script that
    cannot be submitted (it no longer compiles, the broker is down) is recorded in the run's ``errors``."""
    with session_scope(factory) as session:
        started = _claim_run(session, trigger, requested_by)
    if started.run_id is None:
        log.info("nightly run not started: run %s is still going", started.running_id)
        return started
    run_id = started.run_id
    with factory() as session:
        scripts = session.execute(
            select(Script.id, Script.owner_id, Script.name, Script.code, Script.version, Script.universe)
            .join(User, User.id == Script.owner_id)
            .where(Script.nightly.is_(True), User.is_active.is_(True))
            .order_by(Script.created_at, Script.id)
        ).all()
    for script_id, owner_id, name, code, version, universe in scripts:
        request = CalculationRequest(script=code, column_name=name, symbols=list(universe), owner_id=owner_id,
                                     script_id=script_id, script_version=version, queue=QUEUE_BULK)  # fmt: skip

        def link(session: Session, job: Job, script_id: uuid.UUID = script_id, version: int = version) -> None:
            session.add(NightlyRunJob(run_id=run_id, job_id=job.id, script_id=script_id, script_version=version))

        try:
            calculations.submit_calculation(factory, request, shard_size=shard_size, enqueue=enqueue, on_write=link)
            started.jobs += 1
        except AppError as exc:
            log.warning("nightly run %s: script %s not submitted: %s", run_id, script_id, exc)
            started.errors.append({"script_id": str(script_id), "error": f"{type(exc).__name__}: {exc}"[:500]})
    with session_scope(factory) as session:
        session.execute(
            update(NightlyRun)
            .where(NightlyRun.id == run_id)
            .values(scripts=len(scripts), jobs=started.jobs, errors=started.errors, submitted_at=text("now()"))
        )
    log.info("nightly run %s: %d jobs submitted for %d scripts", run_id, started.jobs, len(scripts))
    return started


# --- latest values ------------------------------------------------------------------------------------------


def cache_key(script_id: uuid.UUID) -> str:
    return f"alphaforge:script-latest:{script_id}"


def harvest(factory: sessionmaker[Session], cache: redis.Redis | None, *, limit: int = 200) -> int:
    """Copy the results of finished nightly jobs into ``script_latest_values``; finish runs whose jobs are all
    harvested. Returns how many jobs were harvested. Safe to run concurrently (row locks, skip locked)."""
    harvested = 0
    with factory() as session:
        pending = session.execute(
            select(NightlyRunJob.run_id, NightlyRunJob.job_id)
            .outerjoin(Job, Job.id == NightlyRunJob.job_id)
            .where(NightlyRunJob.harvested_at.is_(None), (Job.status.in_(_FINISHED)) | (Job.id.is_(None)))
            .limit(limit)
        ).all()
    for run_id, job_id in pending:
        with session_scope(factory) as session:
            link = session.scalars(
                select(NightlyRunJob)
                .where(NightlyRunJob.run_id == run_id, NightlyRunJob.job_id == job_id)
                .where(NightlyRunJob.harvested_at.is_(None))
                .with_for_update(skip_locked=True)
            ).first()
            if link is None:
                continue
            session.execute(
                text(
                    """
                    INSERT INTO script_latest_values
                        (script_id, symbol, value, error, script_version, job_id, computed_at)
                    SELECT :script_id, r.symbol, r.value, r.error, :version, r.job_id, r.computed_at
                    FROM job_results r
                    WHERE r.job_id = :job_id AND EXISTS (SELECT 1 FROM scripts s WHERE s.id = :script_id)
                    ON CONFLICT (script_id, symbol) DO UPDATE
                    SET value = excluded.value, error = excluded.error, script_version = excluded.script_version,
                        job_id = excluded.job_id, computed_at = excluded.computed_at
                    WHERE script_latest_values.computed_at <= excluded.computed_at
                    """
                ),
                {"script_id": link.script_id, "version": link.script_version, "job_id": job_id},
            )  # fmt: skip
            link.harvested_at = session.scalar(select(func.now()))
            script_id = link.script_id
        harvested += 1
        _drop_cached(cache, script_id)
    with session_scope(factory) as session:
        session.execute(
            text(
                """
                UPDATE nightly_runs r SET status = 'finished', finished_at = now()
                WHERE r.status = 'running' AND r.submitted_at IS NOT NULL
                  AND NOT EXISTS (SELECT 1 FROM nightly_run_jobs j WHERE j.run_id = r.id AND j.harvested_at IS NULL)
                """
            )
        )
    return harvested


def _drop_cached(cache: redis.Redis | None, script_id: uuid.UUID) -> None:
    if cache is None:
        return
    try:
        cache.delete(cache_key(script_id))
    except redis.RedisError:
        log.warning("could not drop the cached latest values of script %s", script_id, exc_info=True)


def _row(value: ScriptLatestValue) -> dict[str, Any]:
    return {
        "symbol": value.symbol,
        "value": value.value,
        "error": value.error,
        "script_version": value.script_version,
        "job_id": str(value.job_id),
        "computed_at": value.computed_at.isoformat(),
    }


def latest_values(
    session: Session, cache: redis.Redis | None, script_id: uuid.UUID
) -> tuple[list[dict[str, Any]], bool]:
    """A script's latest nightly values ordered by symbol, and whether they came from the Redis cache. Without
    Redis the database answers."""
    key = cache_key(script_id)
    if cache is not None:
        try:
            raw = cache.get(key)
            if raw is not None:
                return json.loads(raw), True
        except redis.RedisError:
            log.warning("latest values cache unavailable; reading the database", exc_info=True)
            cache = None
    rows = [
        _row(v)
        for v in session.scalars(
            select(ScriptLatestValue).where(ScriptLatestValue.script_id == script_id).order_by(ScriptLatestValue.symbol)
        )
    ]
    if cache is not None:
        try:
            cache.set(key, json.dumps(rows, separators=(",", ":")), ex=CACHE_TTL_S)
        except redis.RedisError:
            log.warning("could not cache the latest values of script %s", script_id, exc_info=True)
    return rows, False
