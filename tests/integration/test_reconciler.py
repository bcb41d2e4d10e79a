"""The shard reconciler against real PostgreSQL, Redis and a real Celery worker.

A lost message is made the way a broker loses one: the job is written and its shard tasks are never published
(``enqueue`` drops them). Everything else is the real code: the queue scan, the worker query, the publisher.
"""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Iterator, Sequence

import pytest
import redis
from celery import Celery
from sqlalchemy import Engine, select, text, update
from sqlalchemy.orm import Session, sessionmaker

from shared.contract import TASK_RUN_CALCULATION_SHARD, create_celery, shard_enqueuer
from shared.infra.config import Settings
from shared.infra.models import Job, JobResult, JobShard
from shared.jobs import calculations, reconciler
from shared.jobs import pipeline as jobs
from shared.jobs.calculations import CalculationRequest
from tests.helpers import FINAL, seed_bars
from worker.maintenance_tasks import SHARD_TASKS, live_task_ids, shard_publisher, task_ids_in_queues

pytestmark = pytest.mark.usefixtures("celery_worker")


@pytest.fixture
def celery_app(settings: Settings) -> Iterator[Celery]:
    app = create_celery(settings)
    yield app
    app.close()


@pytest.fixture
def broker(settings: Settings) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(settings.require_redis_url())
    yield client
    client.close()


def lose_messages(tasks: Sequence[jobs.ShardTask]) -> None:
    """A broker that accepted the tasks and then lost them (restart without persistence, eviction)."""


def submit(factory: sessionmaker[Session], symbols: list[str], enqueue: jobs.Enqueue, *, script: str = "result = 1",
           shard_size: int = 5) -> Job:  # fmt: skip
    request = CalculationRequest(script=script, column_name="c", symbols=symbols)
    return calculations.submit_calculation(factory, request, shard_size=shard_size, enqueue=enqueue)


def run_pass(
    factory: sessionmaker[Session],
    app: Celery,
    broker: redis.Redis,
    *,
    grace_s: float = 0.0,
    max_requeues: int = 3,
    requeue: reconciler.Requeue | None = None,
    queued: bool = True,
) -> reconciler.ReconcileReport:
    return reconciler.reconcile(
        factory,
        live_tasks=lambda wanted: live_task_ids(app, broker, wanted),
        requeue=requeue or shard_publisher(app),
        kinds=SHARD_TASKS.keys(),
        grace_s=grace_s,
        max_requeues=max_requeues,
        queued=queued,
    )


def wait_final(factory: sessionmaker[Session], job_id: uuid.UUID, timeout_s: float = 60) -> Job:
    deadline = time.monotonic() + timeout_s
    while True:
        with factory() as session:
            job = session.get(Job, job_id)
            assert job is not None
            if job.status in FINAL:
                return job
        assert time.monotonic() < deadline, f"job {job_id} still {job.status}"
        time.sleep(0.05)


def shards_of(factory: sessionmaker[Session], job_id: uuid.UUID) -> list[JobShard]:
    with factory() as session:
        return list(session.scalars(select(JobShard).where(JobShard.job_id == job_id).order_by(JobShard.index)))


def test_lost_shards_are_published_again_and_the_job_finishes(
    clean_db: Engine, session_factory: sessionmaker[Session], celery_app: Celery, broker: redis.Redis
) -> None:
    symbols = [f"L{i:02d}" for i in range(12)]
    seed_bars(clean_db, symbols, days=10)
    job = submit(session_factory, symbols, lose_messages, script="result = close[-1]")
    before = {s.id: s.task_id for s in shards_of(session_factory, job.id)}
    # Nothing runs: the messages are gone (on no queue; that no worker holds them either is what the pass below
    # finds: alive == 0).
    queues = [q.name for q in celery_app.conf.task_queues or ()]
    assert task_ids_in_queues(broker, queues, set(before.values())) == set()
    assert wait_status(session_factory, job.id) == "queued"

    report = run_pass(session_factory, celery_app, broker)
    assert report.candidates == 3 and report.alive == 0 and sorted(report.requeued) == sorted(before)
    final = wait_final(session_factory, job.id)
    assert final.status == "succeeded" and final.symbols_done == 12
    after = shards_of(session_factory, job.id)
    assert all(s.requeues == 1 and s.task_id != before[s.id] for s in after)
    with session_factory() as session:
        assert len(session.scalars(select(JobResult.symbol).where(JobResult.job_id == job.id)).all()) == 12
    assert run_pass(session_factory, celery_app, broker).candidates == 0  # finished shards are left alone


def wait_status(factory: sessionmaker[Session], job_id: uuid.UUID) -> str:
    with factory() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job.status


def test_nothing_is_judged_within_the_grace_period(
    clean_db: Engine, session_factory: sessionmaker[Session], celery_app: Celery, broker: redis.Redis
) -> None:
    job = submit(session_factory, ["G1", "G2"], lose_messages)
    report = run_pass(session_factory, celery_app, broker, grace_s=3600)
    assert report.candidates == 0 and report.requeued == []
    assert [s.requeues for s in shards_of(session_factory, job.id)] == [0]


def test_a_dead_workers_prefetched_shards_are_judged_at_once(
    clean_db: Engine, session_factory: sessionmaker[Session], celery_app: Celery, broker: redis.Redis
) -> None:
    """A lease pass that finds a dead holder (its lease expired, its task found nowhere) also judges the queued
    shards published before that lease ran out, however young: the dead worker may have prefetched them. Those
    published after it, and every queued shard of a pass that finds no death, are left to the grace rule."""
    symbols = [f"P{i:02d}" for i in range(15)]
    seed_bars(clean_db, symbols, days=5)
    job = submit(session_factory, symbols, lose_messages)  # three shards; their messages are lost
    assert run_pass(session_factory, celery_app, broker, grace_s=3600, queued=False).candidates == 0
    held, *prefetched = shards_of(session_factory, job.id)
    with session_factory() as session, session.begin():
        session.execute(
            update(JobShard).where(JobShard.job_id == job.id).values(enqueued_at=text("now() - interval '5 seconds'"))
        )
        session.execute(
            update(JobShard)
            .where(JobShard.id == held.id)
            .values(
                status="running", lease_holder="dead@host pid 1", lease_expires_at=text("now() - interval '1 second'")
            )
        )
    later = submit(session_factory, ["Q1", "Q2"], lose_messages)  # published after the death: not its prefetch
    report = run_pass(session_factory, celery_app, broker, grace_s=3600, queued=False)
    assert sorted(report.requeued) == sorted([held.id, *(s.id for s in prefetched)]) and report.alive == 0
    final = wait_final(session_factory, job.id)
    assert final.status == "succeeded" and final.symbols_done == 15
    assert [s.requeues for s in shards_of(session_factory, later.id)] == [0]
    assert wait_status(session_factory, later.id) == "queued"


def test_a_shard_that_keeps_vanishing_fails_with_the_reason(
    clean_db: Engine, session_factory: sessionmaker[Session], celery_app: Celery, broker: redis.Redis
) -> None:
    seed_bars(clean_db, ["V1", "V2", "V3"], days=5)
    job = submit(session_factory, ["V1", "V2", "V3"], lose_messages, shard_size=2)
    for expected_requeues in (1, 2):
        report = run_pass(session_factory, celery_app, broker, max_requeues=2, requeue=lambda kind, queue, tasks: None)
        assert len(report.requeued) == 2 and report.failed == []
        assert [s.requeues for s in shards_of(session_factory, job.id)] == [expected_requeues] * 2
    report = run_pass(session_factory, celery_app, broker, max_requeues=2)
    assert report.requeued == [] and len(report.failed) == 2
    final = wait_final(session_factory, job.id, timeout_s=5)
    assert final.status == "failed" and final.shards_failed == 2 and final.symbols_failed == 3
    reason = reconciler.gave_up_reason(2)
    assert final.error == reason and "gave up after 2 re-enqueues" in reason
    with session_factory() as session:
        errors = session.scalars(select(JobResult.error).where(JobResult.job_id == job.id)).all()
    assert errors == [{"type": "ShardFailed", "message": reason, "line": None}] * 3


def test_a_message_waiting_in_a_queue_is_alive(celery_app: Celery, broker: redis.Redis) -> None:
    parked = f"af-test-parked-{uuid.uuid4().hex[:8]}"  # a queue no worker consumes
    task_id = str(uuid.uuid4())
    try:
        celery_app.send_task(TASK_RUN_CALCULATION_SHARD, args=(0,), task_id=task_id, queue=parked)
        for _ in range(3):  # with others around it, and on later pages
            celery_app.send_task(TASK_RUN_CALCULATION_SHARD, args=(0,), queue=parked)
        assert task_ids_in_queues(broker, [parked], {task_id, "not-there"}) == {task_id}
        assert task_ids_in_queues(broker, ["af-test-empty"], {task_id}) == set()
    finally:
        broker.delete(parked)


def test_a_shard_running_in_a_live_worker_is_left_alone(
    clean_db: Engine,
    session_factory: sessionmaker[Session],
    celery_app: Celery,
    broker: redis.Redis,
    celery_worker: subprocess.Popen[bytes],
) -> None:
    """Its live lease keeps it out of the candidates; once the lease has lapsed (the holder stalled: here the lease
    is handed to a holder that does not renew it), the worker query still finds the task and nothing is
    re-published."""
    seed_bars(clean_db, ["R1", "R2"], days=5)
    script = "s = 0\nfor i in range(1500000):\n    s += i\nresult = 1"  # about a second per symbol
    job = submit(session_factory, ["R1", "R2"], shard_enqueuer(celery_app), script=script)
    deadline = time.monotonic() + 20
    while shards_of(session_factory, job.id)[0].status != "running":
        assert time.monotonic() < deadline, "the shard never started"
        time.sleep(0.05)
    [running] = shards_of(session_factory, job.id)
    assert running.lease_holder and running.lease_expires_at is not None  # the claim took the lease
    report = run_pass(session_factory, celery_app, broker)
    assert report.candidates == 0  # a live lease: not even asked about
    with session_factory() as session, session.begin():
        session.execute(
            update(JobShard)
            .where(JobShard.id == running.id, JobShard.status == "running")
            .values(lease_holder="stalled", lease_expires_at=text("now() - interval '1 second'"))
        )
    report = run_pass(session_factory, celery_app, broker)
    assert report.candidates == 1 and report.alive == 1 and report.requeued == [] and report.failed == []
    final = wait_final(session_factory, job.id)
    assert final.status == "succeeded"
    assert [(s.requeues, s.attempts) for s in shards_of(session_factory, job.id)] == [(0, 1)]


def test_one_pass_at_a_time(engine: Engine) -> None:
    with reconciler.single_flight(engine, "test") as first, reconciler.single_flight(engine, "test") as second:
        assert first is True and second is False
    with reconciler.single_flight(engine, "test") as again:
        assert again is True
