"""The terminal event of a job is the last one on its stream, always (shared/infra/events.py's append script), against
the real Redis and, end to end, with a job cancelled while its shard runs on the real Celery worker."""

from __future__ import annotations

import random
import threading
import time
import uuid
from typing import Any

import pytest
import redis
from celery import Celery
from flask.testing import FlaskClient
from sqlalchemy import Engine, select

from shared.infra import events as job_events
from shared.infra.config import Settings
from shared.infra.events import RedisJobEvents, stream_key
from shared.infra.models import JobShard
from tests.helpers import seed_bars


@pytest.fixture
def redis_client(settings: Settings) -> Any:
    client = redis.Redis.from_url(settings.require_redis_url())
    yield client
    client.close()


def _kinds(events: RedisJobEvents, job_id: uuid.UUID) -> list[str]:
    return [e.type for e in events.read(job_id, job_events.START_ID, count=100_000)]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_terminal_event_is_last_under_concurrent_publishers(redis_client: redis.Redis, seed: int) -> None:
    """Eight threads publish shard events while a ninth publishes the terminal event part-way through: whatever
    the interleaving, the terminal event is the last entry and there is exactly one; every event published
    before it is kept."""
    rng = random.Random(seed)
    job_id = uuid.uuid4()
    events = RedisJobEvents(redis_client)
    start = threading.Barrier(9)
    kept: list[str] = []
    kept_lock = threading.Lock()

    def shard(index: int) -> None:
        start.wait()
        for n in range(60):
            kind = job_events.SHARD_STARTED if n % 2 == 0 else job_events.SHARD_FINISHED
            event_id = events._publish(job_id, kind, {"shard": index, "n": n})
            if event_id is not None:
                with kept_lock:
                    kept.append(event_id)

    def terminal() -> None:
        start.wait()
        time.sleep(rng.uniform(0.0, 0.05))  # lands somewhere among the shard events
        events.publish(job_id, job_events.CANCELLED, {"status": "cancelled"})

    threads = [threading.Thread(target=shard, args=(i,)) for i in range(8)] + [threading.Thread(target=terminal)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    stream = events.read(job_id, job_events.START_ID, count=100_000)
    kinds = [e.type for e in stream]
    print(f"seed {seed}: {len(stream) - 1} shard events before the terminal one, {8 * 60 - len(kept)} dropped")
    assert kinds[-1] == job_events.CANCELLED and kinds.count(job_events.CANCELLED) == 1
    assert sorted(e.id for e in stream[:-1]) == sorted(kept)  # an id was returned exactly for what was kept
    # Later events, terminal ones included, are dropped: the stream is closed.
    assert events._publish(job_id, job_events.SHARD_FINISHED, {"shard": 0}) is None
    events.publish(job_id, job_events.FINISHED, {"status": "succeeded"})
    events.ensure_terminal(job_id, "failed", {})
    assert _kinds(events, job_id) == kinds


def test_racing_terminal_publishers_write_one(redis_client: redis.Redis) -> None:
    """A cancel and the last shard's ``finished`` on another host at the same moment: one wins, nothing follows."""
    events = RedisJobEvents(redis_client)
    for _ in range(20):
        job_id = uuid.uuid4()
        events.publish(job_id, job_events.QUEUED, {})
        start = threading.Barrier(3)

        def publish(kind: str, job_id: uuid.UUID = job_id, start: threading.Barrier = start) -> None:
            start.wait()
            events.publish(job_id, job_events.SHARD_FINISHED, {"shard": 0})
            events.publish(job_id, kind, {"status": kind})

        threads = [threading.Thread(target=publish, args=(k,)) for k in (job_events.CANCELLED, job_events.FINISHED,
                                                                           job_events.FAILED)]  # fmt: skip
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        kinds = _kinds(events, job_id)
        assert kinds[-1] in job_events.TERMINAL and sum(k in job_events.TERMINAL for k in kinds) == 1, kinds


def test_closed_stream_expires_with_its_marker(redis_client: redis.Redis) -> None:
    """The terminal append gives the stream and its marker the same TTL; a dropped event renews neither."""
    events = RedisJobEvents(redis_client)
    job_id = uuid.uuid4()
    key = stream_key(job_id)
    events.publish(job_id, job_events.QUEUED, {})
    redis_client.expire(key, 100)
    events.publish(job_id, job_events.FINISHED, {"status": "succeeded"})
    ttls = (redis_client.ttl(key), redis_client.ttl(f"{key}:terminal"))
    assert all(job_events.STREAM_TTL_S - 60 < t <= job_events.STREAM_TTL_S for t in ttls), ttls
    redis_client.expire(key, 100)
    redis_client.expire(f"{key}:terminal", 100)
    events.publish(job_id, job_events.SHARD_FINISHED, {"shard": 0})
    assert redis_client.ttl(key) <= 100 and redis_client.ttl(f"{key}:terminal") <= 100


def _active_task_ids(celery_app: Celery) -> set[str]:
    active = celery_app.control.inspect(timeout=2).active() or {}
    return {task["id"] for tasks in active.values() for task in tasks}


def test_cancel_while_a_shard_runs_leaves_the_terminal_event_last(
    client: FlaskClient, engine: Engine, settings: Settings, redis_client: redis.Redis, celery_worker: Any
) -> None:
    """A shard spinning on the real worker when its job is cancelled finishes afterwards and publishes its
    ``shard_finished``: that event must not land after ``cancelled``."""
    from shared.contract import create_celery

    seed_bars(engine, ["SPIN"], days=30)
    body = {"script": "while True:\n    pass", "column_name": "c", "stock_symbols": ["SPIN"]}
    response = client.post("/api/custom-calculations/execute", json=body)
    assert response.status_code == 202, response.get_json()
    job_id = uuid.UUID(response.get_json()["job_id"])
    events = RedisJobEvents(redis_client)
    deadline = time.monotonic() + 60
    while job_events.SHARD_STARTED not in _kinds(events, job_id):
        assert time.monotonic() < deadline, "the shard never started"
        time.sleep(0.05)
    assert client.post(f"/api/jobs/{job_id}/cancel").get_json()["status"] == "cancelled"

    # Wait until the shard's task has returned (its shard_finished published, or dropped).
    with engine.connect() as conn:
        task_id, status = conn.execute(select(JobShard.task_id, JobShard.status).where(JobShard.job_id == job_id)).one()
    assert status == "running"  # it was running when the job was cancelled: the race is real
    celery_app = create_celery(settings)
    try:
        deadline = time.monotonic() + 60
        while True:
            with engine.connect() as conn:
                status = conn.scalar(select(JobShard.status).where(JobShard.job_id == job_id))
            if status != "running" and task_id not in _active_task_ids(celery_app):
                break
            assert time.monotonic() < deadline, "the running shard never finished"
            time.sleep(0.2)
    finally:
        celery_app.close()
    kinds = _kinds(events, job_id)
    print("stream:", kinds, "shard status:", status)
    assert status == "succeeded"  # the shard ran to its end (its symbol timed out) after the cancel
    assert kinds == [job_events.QUEUED, job_events.SHARD_STARTED, job_events.CANCELLED]
