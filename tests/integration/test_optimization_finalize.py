"""The optimisation kind's finalization (``shared.jobs.pipeline.Finalize``: ``finalize.Finalizer``), on real
PostgreSQL, with the slices run in this process: the outcome commits with the final status (nobody reads the status
final without it) and the artifacts follow the commit; a worker that dies before that commit leaves the slice open
for a redelivery or the reconciler, which end and finalize the job; a cancelled job is finalized by a worker (the
slice that closes last, the cancel's follow-up, or the reconciler's finalize pass); a finalization that fails for a
reason other than the database lets the job end, with ``jobs.finalize_error`` saying why."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import pytest
import sqlalchemy.exc
from sqlalchemy import Engine, select, text, update
from sqlalchemy.orm import Session, sessionmaker

from api.optimizations import spec_from_body
from shared.infra.artifact_store import ArtifactStore
from shared.infra.config import Settings
from shared.infra.db import make_session_factory
from shared.infra.models import Job, JobShard, Optimization, RunManifest
from shared.jobs import pipeline as jobs
from shared.jobs import reconciler
from shared.jobs.optimizations import artifacts, finalize, shard, submit
from shared.jobs.optimizations.spec import Limits, OptimizationRequest
from tests.helpers import ApiUser, seed_bars
from tests.integration.test_optimizations import SYMBOLS, body

FINALIZERS: dict[str, jobs.Finalize] = {"optimization": finalize.Finalizer()}


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
    """One snapshot (another connection): the job's status, ``finalized_at``, the outcome, whether a manifest exists."""
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


def test_the_outcome_commits_with_the_final_status_and_the_artifacts_follow(
    factory: sessionmaker[Session], settings: Settings, user: ApiUser
) -> None:
    job_id, shard_ids = submitted(factory, user.id)
    seen_by_hook: list[tuple[str, str]] = []

    def hook(session: Session, job: Job) -> None:
        seen_by_hook.append((job.status, state(factory, job_id)[0]))  # (what it is told, what others read)
        finalize.Finalizer()(session, job)

    events = Events()
    for shard_id in shard_ids[:-1]:
        assert shard.run_shard(factory, shard_id, finalize=hook, events=events) is True
        assert state(factory, job_id)[:2] == ("running", None) and seen_by_hook == []
    assert shard.run_shard(factory, shard_ids[-1], finalize=hook, events=events) is True
    assert seen_by_hook == [("succeeded", "running")]  # told its final status, while others still read running
    status, finalized_at, outcome, manifest = state(factory, job_id)
    assert status == "succeeded" and finalized_at is not None  # committed together with the outcome
    assert outcome is not None and outcome["status"] == "succeeded" and outcome["best"] is not None
    assert not manifest  # files are not the transaction's: written after its commit
    kinds = [k for j, k, _ in events.seen if j == job_id]
    assert kinds[-1] == "finished" and kinds.count("finished") == 1
    # a duplicate delivery of any slice changes nothing and calls no hook
    assert shard.run_shard(factory, shard_ids[0], finalize=hook, events=events) is None
    assert len(seen_by_hook) == 1 and [k for j, k, _ in events.seen if j == job_id].count("finished") == 1
    store = ArtifactStore.from_settings(settings)
    built = artifacts.build_if_finished(factory, store, job_id)
    assert built is not None and {"optimization.json", "results.csv"} <= {f["name"] for f in built.manifest["files"]}
    assert state(factory, job_id)[3]
    again = artifacts.build_if_finished(factory, store, job_id)
    assert again is not None and again.id == built.id  # once
    assert state(factory, job_id)[2] == outcome  # the artifacts read the stored outcome, never recompute it


def reconciler_requeues(factory: sessionmaker[Session], shard_id: int) -> bool:
    """The reconciler's frequent pass leaves the running slice alone while its lease is live, and requeues it once
    the lease lapsed (its worker is gone; no live worker holds its task)."""
    requeued: list[int] = []

    def requeue(kind: str, queue: str, tasks: Sequence[jobs.ShardTask]) -> None:
        requeued.extend(t.shard_id for t in tasks)

    def lease(expires: str) -> None:
        with factory() as session, session.begin():
            session.execute(update(JobShard).where(JobShard.id == shard_id).values(
                lease_holder="dead worker", lease_expires_at=text(expires)))  # fmt: skip

    def frequent_pass() -> reconciler.ReconcileReport:
        return reconciler.reconcile(factory, live_tasks=lambda wanted: set(), requeue=requeue, kinds=["optimization"],
                                    grace_s=3600, max_requeues=3, queued=False, finalizers=FINALIZERS)  # fmt: skip

    lease("now() + interval '1 hour'")  # its worker may be alive: left alone
    assert frequent_pass().requeued == [] and requeued == []
    lease("now() - interval '1 minute'")
    return frequent_pass().requeued == [shard_id] and requeued == [shard_id]


def test_a_worker_dead_before_the_final_commit_leaves_the_slice_for_a_redelivery_or_the_reconciler(
    factory: sessionmaker[Session], user: ApiUser
) -> None:
    def database_gone(session: Session, job: Job) -> None:
        raise sqlalchemy.exc.OperationalError("SELECT 1", {}, Exception("server closed the connection"))

    for upper, path in ((70, "redelivery"), (75, "reconciler")):
        job_id, shard_ids = submitted(factory, user.id, upper)
        for shard_id in shard_ids[:-1]:
            shard.run_shard(factory, shard_id, finalize=database_gone)
        with pytest.raises(sqlalchemy.exc.OperationalError):
            shard.run_shard(factory, shard_ids[-1], finalize=database_gone)
        # the whole final transaction rolled back: never final without the outcome, the last slice still open
        assert state(factory, job_id) == ("running", None, None, False), path
        with factory() as session:
            job = session.get(Job, job_id)
            last = session.get(JobShard, shard_ids[-1])
            assert job is not None and (job.shards_done, job.shards_total) == (2, 3), path
            assert last is not None and last.status == "running", path
        if path == "redelivery":  # the slice's task again (acks late): its shard is still running, claimed again
            assert shard.run_shard(factory, shard_ids[-1], finalize=finalize.Finalizer()) is True
        else:
            assert reconciler_requeues(factory, shard_ids[-1])
            assert shard.run_shard(factory, shard_ids[-1], finalize=finalize.Finalizer()) is True  # the new task
        status, finalized_at, outcome, _ = state(factory, job_id)
        assert status == "succeeded" and finalized_at is not None, path
        assert outcome is not None and outcome["best"] is not None, path


def test_a_cancelled_optimisation_is_finalized_by_a_worker(factory: sessionmaker[Session], user: ApiUser) -> None:
    """Cancelled while a slice runs: the slice that closes last stores the outcome. Cancelled while every other slice
    waits: the cancel's follow-up task (``finalize_job``), or, if that task was lost, the reconciler's finalize pass.
    """
    # a slice running at the cancel: its close finalizes
    running_job, shard_ids = submitted(factory, user.id, 70)
    shard.run_shard(factory, shard_ids[0], finalize=finalize.Finalizer())
    assert jobs.start_shard(factory, shard_ids[1]) is not None  # claimed by a worker
    jobs.cancel_job(factory, running_job)  # the third, queued, is cancelled
    assert state(factory, running_job)[:2] == ("cancelled", None)
    assert jobs.complete_shard(factory, shard_ids[1], [], finalize=finalize.Finalizer()) is True
    status, finalized_at, outcome, _ = state(factory, running_job)
    assert status == "cancelled" and finalized_at is not None
    assert outcome is not None and outcome["status"] == "cancelled" and outcome["combos_scored"] == 1

    for upper, path in ((75, "follow-up task"), (80, "reconciler")):
        job_id, shard_ids = submitted(factory, user.id, upper)
        shard.run_shard(factory, shard_ids[0], finalize=finalize.Finalizer())
        jobs.cancel_job(factory, job_id)  # the other slices never ran: cancelled while queued
        assert state(factory, job_id)[:2] == ("cancelled", None), path
        if path == "follow-up task":
            # what TASK_FINISH_OPTIMIZATION does
            assert jobs.finalize_job(factory, job_id, finalize.Finalizer()) is True
            assert jobs.finalize_job(factory, job_id, finalize.Finalizer()) is False  # once
        else:
            assert reconciler.finalize_ended(factory, finalizers=FINALIZERS, grace_s=3600).finalized == []  # in grace
            done = reconciler.finalize_ended(factory, finalizers=FINALIZERS, grace_s=0)
            assert done.finalized == [("optimization", job_id)]
        status, finalized_at, outcome, _ = state(factory, job_id)
        assert status == "cancelled" and finalized_at is not None, path
        assert outcome is not None and outcome["status"] == "cancelled" and outcome["combos_scored"] == 1, path


def test_a_finalization_failing_on_its_own_ends_the_job_with_the_error(
    factory: sessionmaker[Session], settings: Settings, user: ApiUser
) -> None:
    job_id, shard_ids = submitted(factory, user.id)

    def broken(session: Session, job: Job) -> None:
        session.execute(update(Optimization).where(Optimization.job_id == job.id).values(outcome={"partial": True}))
        raise ValueError("a bug in the hook")

    for shard_id in shard_ids:
        shard.run_shard(factory, shard_id, finalize=broken)
    status, finalized_at, outcome, _ = state(factory, job_id)
    assert status == "succeeded" and finalized_at is None  # no job waits forever
    assert outcome is None  # what the hook wrote before it raised is rolled back with it
    with factory() as session:
        error = session.scalar(select(Job.finalize_error).where(Job.id == job_id))
    assert error == "ValueError: a bug in the hook"
    store = ArtifactStore.from_settings(settings)
    assert artifacts.build_if_finished(factory, store, job_id) is None  # no artifacts of an unfinalized job
    # nothing retries it on its own; once fixed and the error cleared, the reconciler's pass finalizes it
    assert reconciler.finalize_ended(factory, finalizers=FINALIZERS, grace_s=0).finalized == []
    with factory() as session, session.begin():
        session.execute(update(Job).where(Job.id == job_id).values(finalize_error=None))
    assert reconciler.finalize_ended(factory, finalizers=FINALIZERS, grace_s=0).finalized == [("optimization", job_id)]
    status, finalized_at, outcome, _ = state(factory, job_id)
    assert status == "succeeded" and finalized_at is not None and outcome is not None and outcome["best"] is not None
