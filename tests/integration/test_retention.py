"""Retention of finished calculation jobs: by age and by count per owner; active jobs are never touched."""

from __future__ import annotations

from collections.abc import Sequence

from flask import Flask
from sqlalchemy import Engine, func, select, text, update
from sqlalchemy.orm import Session, sessionmaker

from shared.infra.models import Job, JobResult, JobShard, SecurityEvent
from shared.jobs import calculations, retention
from shared.jobs import pipeline as jobs
from shared.jobs.calculations import CalculationRequest
from tests.helpers import make_user


def _drop(tasks: Sequence[jobs.ShardTask]) -> None:
    """Nothing runs: the test finishes the jobs itself."""


def make_job(factory: sessionmaker[Session], owner_id: str, *, status: str, age_days: float) -> str:
    request = CalculationRequest(script="result = 1", column_name="c", symbols=["A", "B"], owner_id=owner_id)
    job = calculations.submit_calculation(factory, request, shard_size=50, enqueue=_drop)
    if status != "queued":
        with factory() as session:
            shard_id = session.scalar(select(JobShard.id).where(JobShard.job_id == job.id))
        assert shard_id is not None
        assert jobs.complete_shard(factory, shard_id, [jobs.Outcome("A", 1.0, None), jobs.Outcome("B", 2.0, None)])
    with factory() as session, session.begin():
        session.execute(
            update(Job).where(Job.id == job.id).values(
                created_at=func.now() - text(f"interval '{age_days} days'"),
                finished_at=(func.now() - text(f"interval '{age_days} days'")) if status != "queued" else None,
            )
        )  # fmt: skip
        session.add(SecurityEvent(owner_id=owner_id, job_id=job.id, layer="language", reason="test", detail=""))
    return str(job.id)


def remaining(factory: sessionmaker[Session]) -> set[str]:
    with factory() as session:
        return {str(i) for i in session.scalars(select(Job.id))}


def test_prune_by_age_and_by_count_keeps_active_jobs(
    flask_app: Flask, clean_db: Engine, session_factory: sessionmaker[Session], test_password_hash: str
) -> None:
    alice = make_user(flask_app, clean_db, "alice", test_password_hash).id
    bob = make_user(flask_app, clean_db, "bob", test_password_hash).id
    old = make_job(session_factory, alice, status="succeeded", age_days=40)
    old_but_active = make_job(session_factory, alice, status="queued", age_days=40)
    alice_recent = [make_job(session_factory, alice, status="succeeded", age_days=d) for d in (5, 4, 3, 2, 1)]
    bob_recent = [make_job(session_factory, bob, status="succeeded", age_days=d) for d in (3, 2)]

    assert retention.prune(session_factory, max_age_days=0, max_jobs_per_owner=0) == retention.PruneReport(0, 0)
    report = retention.prune(session_factory, max_age_days=30, max_jobs_per_owner=3)
    assert report == retention.PruneReport(by_age=1, by_count=2)
    assert remaining(session_factory) == {old_but_active, *alice_recent[2:], *bob_recent}
    assert old not in remaining(session_factory)
    with session_factory() as session:
        kept_results = session.scalar(select(func.count()).select_from(JobResult))
        events = session.scalar(select(func.count()).select_from(SecurityEvent))
    assert kept_results == 2 * 5  # results go with their job (3 of alice's, 2 of bob's)
    assert events == 9  # security events outlive the jobs they name
    assert retention.prune(session_factory, max_age_days=30, max_jobs_per_owner=3) == retention.PruneReport(0, 0)
