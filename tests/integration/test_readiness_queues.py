"""GET /api/health/ready reports each queue's depth (every priority list) and the live workers consuming it, and is
not ready while no worker consumes ``interactive``."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis
from flask.testing import FlaskClient
from sqlalchemy import Engine

from api import create_app
from shared.contract import create_celery, shard_enqueuer
from shared.infra.config import Settings
from shared.jobs.pipeline import ShardTask
from tests.integration.test_faults_worker_kill import Processes, wait_for

READY_REDIS_DB = 8


@pytest.mark.usefixtures("celery_worker")
def test_ready_lists_queue_depth_and_workers_per_queue(anon_client: FlaskClient) -> None:
    ready = anon_client.get("/api/health/ready")
    assert ready.status_code == 200, ready.json
    queues: dict[str, Any] = ready.json["queues"]  # type: ignore[index]
    assert queues["ok"] is True
    for name in ("interactive", "bulk", "maintenance"):
        assert queues[name]["workers"] >= 1 and queues[name]["depth"] >= 0


@pytest.fixture
def maintenance_only(settings: Settings, api_state: Engine) -> Iterator[tuple[Settings, Processes]]:
    """A Redis database of its own with one worker that consumes only the maintenance queue."""
    base, _, _db = settings.require_redis_url().rpartition("/")
    own = settings.with_overrides(redis_url=f"{base}/{READY_REDIS_DB}")
    client = redis.Redis.from_url(own.require_redis_url())
    client.flushdb()
    procs = Processes(own)
    try:
        procs.start("ready-worker", "worker", "--queues=maintenance", "--hostname", "ready@%h", "--concurrency", "1")
        yield own, procs
    finally:
        procs.stop_all()
        client.flushdb()
        client.close()


def test_not_ready_without_an_interactive_consumer_and_waiting_shards_counted(
    maintenance_only: tuple[Settings, Processes],
) -> None:
    own, _ = maintenance_only
    celery = create_celery(own)
    app = create_app(own)
    try:
        wait_for(lambda: celery.control.ping(timeout=0.5), 60, "the maintenance-only worker")
        # Three shard messages nobody here consumes, on priorities 0, 1 and 1 (shared/jobs/fairness.py).
        shard_enqueuer(celery)([ShardTask(i, f"ready-test-{i}") for i in range(3)])
        response = app.test_client().get("/api/health/ready")
        body: dict[str, Any] = response.json  # type: ignore[assignment]
    finally:
        celery.close()
        app.extensions["alphaforge"].engine.dispose()
    assert response.status_code == 503 and body["status"] == "not_ready"
    assert body["workers"]["ok"] is True and body["workers"]["count"] == 1
    queues = body["queues"]
    assert queues["ok"] is False
    assert queues["interactive"] == {"depth": 3, "workers": 0}
    assert queues["maintenance"]["workers"] == 1 and queues["bulk"] == {"depth": 0, "workers": 0}
