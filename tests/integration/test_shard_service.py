"""The job/shard service in-process: real PostgreSQL and the real sandbox, Celery left out."""

from __future__ import annotations

import json
import logging

import pytest
import sqlalchemy.exc
from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session, sessionmaker

from shared.errors import ScriptCompileError
from shared.infra.config import SandboxLimits
from shared.infra.models import Job, JobResult, JobShard, SecurityEvent
from shared.jobs import calculations
from shared.jobs import pipeline as jobs
from shared.jobs.calculations import CalculationRequest
from shared.sandbox.runner import run_script
from tests.helpers import seed_bars

LIMITS = SandboxLimits(symbol_timeout_s=2.0, memory_mb=512)


def submit(
    factory: sessionmaker[Session], script: str, symbols: list[str], shard_size: int = 2
) -> tuple[Job, list[int]]:
    sent: list[jobs.ShardTask] = []
    request = CalculationRequest(script=script, column_name="c", symbols=symbols)
    job = calculations.submit_calculation(factory, request, shard_size=shard_size, enqueue=sent.extend)
    return job, [task.shard_id for task in sent]


def test_shards_complete_once_and_the_last_one_finalizes(
    clean_db: Engine, session_factory: sessionmaker[Session]
) -> None:
    seed_bars(clean_db, ["A", "B", "C"], days=10)
    job, shard_ids = submit(session_factory, "result = close[-1]", ["A", "B", "C"])
    assert len(shard_ids) == 2
    assert calculations.run_shard(session_factory, shard_ids[0], limits=LIMITS, runner=run_script) is True
    with session_factory() as session:
        assert session.get(Job, job.id).status == "running"  # type: ignore[union-attr]
    assert calculations.run_shard(session_factory, shard_ids[1], limits=LIMITS, runner=run_script) is True
    # A second delivery of either shard, or giving up on it late, changes nothing.
    assert calculations.run_shard(session_factory, shard_ids[0], limits=LIMITS, runner=run_script) is None
    assert jobs.fail_shard(session_factory, shard_ids[1], "late failure") is False
    with session_factory() as session:
        final = session.get(Job, job.id)
        assert final is not None and final.status == "succeeded"
        assert (final.shards_done, final.symbols_done, final.symbols_failed) == (2, 3, 0)
        assert len(session.scalars(select(JobResult).where(JobResult.job_id == job.id)).all()) == 3


def test_giving_up_on_a_shard_records_the_reason_per_symbol(
    clean_db: Engine, session_factory: sessionmaker[Session]
) -> None:
    seed_bars(clean_db, ["A", "B"], days=5)
    job, shard_ids = submit(session_factory, "result = 1", ["A", "B"], shard_size=1)
    assert jobs.fail_shard(session_factory, shard_ids[0], "gave up after 4 attempts: OperationalError") is True
    calculations.run_shard(session_factory, shard_ids[1], limits=LIMITS, runner=run_script)
    with session_factory() as session:
        final = session.get(Job, job.id)
        assert final is not None and final.status == "partial" and final.shards_failed == 1
        assert final.error == "gave up after 4 attempts: OperationalError"
        error = session.scalar(select(JobResult.error).where(JobResult.job_id == job.id, JobResult.symbol == "A"))
        assert error == {"type": "ShardFailed", "message": "gave up after 4 attempts: OperationalError", "line": None}
        assert session.scalar(select(JobShard.status).where(JobShard.id == shard_ids[0])) == "failed"


def test_sandbox_rejections_and_policy_violations_are_security_events(
    clean_db: Engine, session_factory: sessionmaker[Session], caplog: pytest.LogCaptureFixture
) -> None:
    seed_bars(clean_db, ["SLOW"], days=5)
    caplog.set_level(logging.WARNING, logger="alphaforge.security")
    with pytest.raises(ScriptCompileError):
        submit(session_factory, "x = ().__class__", ["SLOW"])
    job, shard_ids = submit(session_factory, "while True:\n    pass", ["SLOW"])
    calculations.run_shard(session_factory, shard_ids[0], limits=LIMITS, runner=run_script)
    events = [json.loads(r.getMessage()) for r in caplog.records if r.name == "alphaforge.security"]
    assert [(e["layer"], e["reason"]) for e in events] == [
        ("language", "compile_policy"),
        ("supervisor", "wall_clock_timeout"),
    ]
    assert "__class__" in events[0]["detail"]
    assert events[1]["job"] == str(job.id) and events[1]["symbol"] == "SLOW" and "time limit" in events[1]["detail"]
    with session_factory() as session:
        rows = session.scalars(select(SecurityEvent).order_by(SecurityEvent.id)).all()
        assert [(r.job_id, r.symbol, r.layer, r.reason) for r in rows] == [
            (None, None, "language", "compile_policy"),
            (job.id, "SLOW", "supervisor", "wall_clock_timeout"),
        ]
        assert "time limit" in rows[1].detail


def test_the_finalize_hook_runs_once_in_the_transaction_that_ends_the_job(
    clean_db: Engine, session_factory: sessionmaker[Session]
) -> None:
    """Called with the job final and its row locked, once, by the shard that ends it; its writes commit with the
    final status. An outage inside it rolls the whole shard back (retried later); any other error is recorded and the
    job ends without it."""
    seed_bars(clean_db, ["A", "B", "C"], days=5)
    calls: list[tuple[str, int]] = []

    def hook(session: Session, job: Job) -> None:
        calls.append((job.status, job.shards_done))
        session.execute(update(Job).where(Job.id == job.id).values(error="finalized by the hook"))

    job, shard_ids = submit(session_factory, "result = 1", ["A", "B", "C"], shard_size=1)
    assert jobs.complete_shard(session_factory, shard_ids[0], [jobs.Outcome("A", 1.0, None)], finalize=hook)
    assert calls == []  # not ended yet

    assert jobs.fail_shard(session_factory, shard_ids[1], "gave up", finalize=hook)
    assert calls == []

    def outage(session: Session, job: Job) -> None:
        raise sqlalchemy.exc.OperationalError("SELECT 1", {}, Exception("server closed the connection"))

    with pytest.raises(sqlalchemy.exc.OperationalError):
        jobs.complete_shard(session_factory, shard_ids[2], [jobs.Outcome("C", 3.0, None)], finalize=outage)
    with session_factory() as session:  # rolled back with the hook: the shard is still open, the job not final
        assert session.scalar(select(JobShard.status).where(JobShard.id == shard_ids[2])) == "queued"
        assert session.scalar(select(Job.status).where(Job.id == job.id)) == "queued"
        assert (
            session.scalar(select(JobResult.symbol).where(JobResult.job_id == job.id, JobResult.symbol == "C")) is None
        )
    assert jobs.complete_shard(session_factory, shard_ids[2], [jobs.Outcome("C", 3.0, None)], finalize=hook)
    assert calls == [("partial", 3)]
    assert jobs.finalize_job(session_factory, job.id, hook) is False  # finalized already: never twice
    with session_factory() as session:
        final = session.get(Job, job.id)
        assert final is not None and final.status == "partial" and final.finalized_at is not None
        assert final.error == "finalized by the hook" and final.finalize_error is None

    def broken(session: Session, job: Job) -> None:
        session.execute(update(Job).where(Job.id == job.id).values(error="half-written"))
        raise ValueError("a bug")

    other, other_shards = submit(session_factory, "result = 1", ["A"], shard_size=1)
    assert jobs.complete_shard(session_factory, other_shards[0], [jobs.Outcome("A", 1.0, None)], finalize=broken)
    with session_factory() as session:
        ended = session.get(Job, other.id)
        assert ended is not None and ended.status == "succeeded" and ended.finalized_at is None
        assert ended.finalize_error == "ValueError: a bug" and ended.error is None  # its writes rolled back
        assert session.scalar(select(JobResult.value).where(JobResult.job_id == other.id)) == 1.0
