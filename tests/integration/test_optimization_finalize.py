"""The finalize hook's contract (shared/jobs/pipeline.py ``finish_job``), on real PostgreSQL, with the slices run in
this process: the job reads final only after the hook stored the outcome; a worker that dies between its last slice
and the hook leaves the job active with every slice finished, and a redelivery of that slice or the reconciler
finishes it; a hook that fails for a reason other than the database ends the job with the error."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import sqlalchemy.exc
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from api.optimizations import spec_from_body
from shared.infra.artifact_store import ArtifactStore
from shared.infra.config import Settings
from shared.infra.db import make_session_factory
from shared.infra.models import Job, JobShard, Optimization, RunManifest
from shared.jobs import pipeline as jobs
from shared.jobs import reconciler
from shared.jobs.optimizations import finalize, shard, submit
from shared.jobs.optimizations.spec import Limits, OptimizationRequest
from tests.helpers import ApiUser, seed_bars
from tests.integration.test_optimizations import SYMBOLS, body


class Events:
    def __init__(self) -> None:
        self.seen: list[tuple[uuid.UUID, str, dict[str, Any]]] = []

    def publish(self, job_id: uuid.UUID, kind: str, data: dict[str, Any]) -> None:
        self.seen.append((job_id, kind, data))


def submitted(factory: sessionmaker[Session], owner_id: str, upper: int = 70) -> tuple[uuid.UUID, list[int]]:
    """A small optimisation of three combos in three slices (one backtest each), its tasks never sent."""
    doc = body(
        strategy="rsi_reversion",
        parameters={"period": [5, 10, 14], "lower": [30], "upper": [upper]},
        objective={"metric": "return_pct", "direction": "max"},  # defined with or without trades: a best exists
        constraints=[],
    )
    spec, _ = spec_from_body(doc)
    done = submit.submit(
        factory,
        OptimizationRequest(spec=spec, owner_id=owner_id),
        Limits(1000, 100_000, 1),
        enqueue=lambda tasks: None,
    )
    with factory() as session:
        shard_ids = list(session.scalars(select(JobShard.id).where(JobShard.job_id == done.job.id)))
    assert len(shard_ids) == 3
    return done.job.id, shard_ids


def state(factory: sessionmaker[Session], job_id: uuid.UUID) -> tuple[str, Any, dict[str, Any] | None, bool]:
    with factory() as session:
        row = session.execute(
            select(Job.status, Job.finalized_at, Optimization.outcome)
            .join(Optimization, Optimization.job_id == Job.id)
            .where(Job.id == job_id)
        ).one()
        manifest = session.scalar(select(RunManifest.id).where(RunManifest.job_id == job_id))
    return row.status, row.finalized_at, row.outcome, manifest is not None


@pytest.fixture
def factory(clean_db: Engine) -> sessionmaker[Session]:
    seed_bars(clean_db, SYMBOLS[:1], days=300, seed=5)
    return make_session_factory(clean_db)


def test_the_job_reads_final_only_after_the_hook_stored_the_outcome(
    factory: sessionmaker[Session], settings: Settings, user: ApiUser
) -> None:
    job_id, shard_ids = submitted(factory, user.id)
    real = finalize.Finalizer(ArtifactStore.from_settings(settings))
    seen_by_hook: list[tuple[str, str]] = []

    def hook(f: sessionmaker[Session], job: Job) -> None:
        seen_by_hook.append((job.status, state(factory, job_id)[0]))  # (what it is told, what the rows say)
        real(f, job)

    events = Events()
    for shard_id in shard_ids[:-1]:
        assert shard.run_shard(factory, shard_id, finalize=hook, events=events) is True
        assert state(factory, job_id)[:2] == ("running", None) and seen_by_hook == []
    assert shard.run_shard(factory, shard_ids[-1], finalize=hook, events=events) is True
    assert seen_by_hook == [("succeeded", "running")]  # told its final status, before the job reads it
    status, finalized_at, outcome, manifest = state(factory, job_id)
    assert status == "succeeded" and finalized_at is not None and manifest
    assert outcome is not None and outcome["status"] == "succeeded" and outcome["best"] is not None
    kinds = [k for j, k, _ in events.seen if j == job_id]
    assert kinds[-1] == "finished" and kinds.count("finished") == 1
    # a duplicate delivery of any slice changes nothing and calls no hook
    assert shard.run_shard(factory, shard_ids[0], finalize=hook, events=events) is None
    assert len(seen_by_hook) == 1 and kinds.count("finished") == 1


def test_a_worker_dead_before_the_hook_leaves_the_job_active_for_a_retry_or_the_reconciler(
    factory: sessionmaker[Session], settings: Settings, user: ApiUser
) -> None:
    store = ArtifactStore.from_settings(settings)

    def database_gone(f: sessionmaker[Session], job: Job) -> None:
        raise sqlalchemy.exc.OperationalError("SELECT 1", {}, Exception("server closed the connection"))

    for upper, path in ((70, "redelivery"), (75, "reconciler")):
        job_id, shard_ids = submitted(factory, user.id, upper)
        for shard_id in shard_ids[:-1]:
            shard.run_shard(factory, shard_id, finalize=database_gone)
        with pytest.raises(sqlalchemy.exc.OperationalError):
            shard.run_shard(factory, shard_ids[-1], finalize=database_gone)
        status, finalized_at, outcome, manifest = state(factory, job_id)
        assert (status, finalized_at, outcome, manifest) == ("running", None, None, False)  # never final without it
        with factory() as session:
            job = session.get(Job, job_id)
            assert job is not None and job.shards_done == job.shards_total == 3
        if path == "redelivery":  # the slice's task again (acks late): its shard is finished, the job is not
            assert shard.run_shard(factory, shard_ids[-1], finalize=finalize.Finalizer(store)) is None
        else:
            with factory() as session:  # within the grace a live worker may be at it: left alone
                assert job_id not in reconciler.unfinalized_jobs(session, ["optimization"], grace_s=3600)
                assert job_id in reconciler.unfinalized_jobs(session, ["optimization"], grace_s=0)
            finished = reconciler.finish_unfinalized(factory, {"optimization": finalize.Finalizer(store)}, grace_s=0)
            assert finished == [job_id]
        status, finalized_at, outcome, manifest = state(factory, job_id)
        assert status == "succeeded" and finalized_at is not None and manifest, path
        assert outcome is not None and outcome["best"] is not None, path
        with factory() as session:
            assert job_id not in reconciler.unfinalized_jobs(session, ["optimization"], grace_s=0)


def test_a_cancelled_job_is_finalized_once_no_slice_runs(
    factory: sessionmaker[Session], settings: Settings, user: ApiUser
) -> None:
    store = ArtifactStore.from_settings(settings)
    job_id, shard_ids = submitted(factory, user.id)
    shard.run_shard(factory, shard_ids[0], finalize=finalize.Finalizer(store))
    jobs.cancel_job(factory, job_id)  # the other slices never ran: cancelled while queued
    assert state(factory, job_id)[:2] == ("cancelled", None)
    assert jobs.finish_job(factory, job_id, finalize.Finalizer(store)) is True  # what the cancel's task does
    status, finalized_at, outcome, manifest = state(factory, job_id)
    assert status == "cancelled" and finalized_at is not None and manifest
    assert outcome is not None and outcome["status"] == "cancelled" and outcome["combos_scored"] == 1
    assert jobs.finish_job(factory, job_id, finalize.Finalizer(store)) is False  # once


def test_a_hook_failing_on_its_own_ends_the_job_with_the_error(factory: sessionmaker[Session], user: ApiUser) -> None:
    job_id, shard_ids = submitted(factory, user.id)

    def broken(f: sessionmaker[Session], job: Job) -> None:
        raise ValueError("a bug in the hook")

    for shard_id in shard_ids:
        shard.run_shard(factory, shard_id, finalize=broken)
    status, finalized_at, outcome, _ = state(factory, job_id)
    assert status == "succeeded" and finalized_at is not None and outcome is None  # no job waits forever
    with factory() as session:
        error = session.scalar(select(Job.error).where(Job.id == job_id))
    assert error is not None and "finalizing failed: ValueError: a bug in the hook" in error
