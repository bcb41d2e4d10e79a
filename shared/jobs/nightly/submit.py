"""Starting a nightly run: at most one at a time (an advisory lock serializes the check and the run row), each
flagged script submitted as an ordinary calculation job of its owner on the bulk queue."""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, select, text, update
from sqlalchemy.orm import Session, sessionmaker

from shared.errors import AppError
from shared.infra.config import QUEUE_BULK
from shared.infra.db import session_scope
from shared.infra.models import Job, NightlyRun, NightlyRunJob, Script, User
from shared.jobs import calculations
from shared.jobs import pipeline as jobs
from shared.jobs.calculations import CalculationRequest

log = logging.getLogger(__name__)


SUBMISSION_DEADLINE = dt.timedelta(hours=1)  # a run still submitting after this died mid-way (its process was killed)


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
