"""What an operator does in Flower, through Flower's HTTP API with basic auth, against a real worker: grow and shrink
the worker's pool, and revoke a waiting shard's task (the shard is skipped, then the reconciler re-publishes it under
a fresh task id and the job still finishes: revoking in Flower is not how a job is cancelled, POST .../cancel is).

A worker, Flower and a Redis database of their own (so no other test's worker takes the shards), shared by the
module's tests.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
import redis
from celery import Celery
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session, sessionmaker

from shared.contract import TASK_RECONCILE_SHARDS, create_celery, shard_enqueuer
from shared.infra.config import QUEUE_INTERACTIVE, QUEUE_MAINTENANCE, Maintenance, Settings
from shared.infra.migrate import PROJECT_ROOT
from shared.infra.models import Job, JobShard
from shared.jobs import calculations
from shared.jobs.calculations import CalculationRequest
from shared.ops.embedded import free_tcp_port
from shared.ops.launcher import child_commands
from tests.helpers import FINAL, broker_holds_task, seed_bars, worker_holds_task
from tests.integration.test_faults_worker_kill import Processes, wait_for

pytestmark = pytest.mark.slow  # scheduled first (tests/conftest.py)

FLOWER_REDIS_DB = 9
AUTH = ("ops", "a-long-flower-passphrase")
WORKER = "flowerctl@flower-test"
SLOW_SCRIPT = "s = 0\nfor i in range(300000):\n    s += i\nresult = close[-1]"
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def call(url: str, method: str = "GET", auth: tuple[str, str] | None = AUTH) -> tuple[int, Any]:
    request = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    try:
        with _NO_PROXY.open(request, timeout=10) as resp:
            body = resp.read()
            return int(resp.status), json.loads(body) if body.strip().startswith((b"{", b"[")) else body
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()
    except OSError:
        return 0, None


@pytest.fixture(scope="module")
def stack(settings: Settings) -> Iterator[tuple[Settings, Processes, str, Celery]]:
    base, _, _db = settings.require_redis_url().rpartition("/")
    own = settings.with_overrides(
        redis_url=f"{base}/{FLOWER_REDIS_DB}",
        flower_port=free_tcp_port(),
        api_host="127.0.0.1",
        maintenance=replace(Maintenance(), reconcile_grace_s=1.0),
    )
    client = redis.Redis.from_url(own.require_redis_url())
    client.flushdb()
    procs = Processes(own)
    app = create_celery(own)
    flower: subprocess.Popen[bytes] | None = None
    try:
        procs.start("flowerctl-worker", "worker", "--hostname", WORKER, "--concurrency", "1")
        (argv,) = [argv for name, argv in child_commands(own) if name == "flower"]
        env = {**os.environ, **own.child_env(), "FLOWER_BASIC_AUTH": ":".join(AUTH), "PYTHONPATH": str(PROJECT_ROOT)}
        log = open(own.data_dir / "flowerctl-flower.log", "wb")  # noqa: SIM115 (closed below)
        flower = subprocess.Popen(argv, cwd=own.data_dir, env=env, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)  # fmt: skip
        url = f"http://127.0.0.1:{own.flower_port}"
        wait_for(lambda: call(f"{url}/healthcheck", auth=None)[0] == 200, 30, "Flower")
        wait_for(lambda: WORKER in (call(f"{url}/api/workers?refresh=1")[1] or {}), 60, "Flower to see the worker")
        yield own, procs, url, app
    finally:
        if flower is not None:
            os.killpg(flower.pid, signal.SIGTERM)
            flower.wait(timeout=20)
            log.close()
        app.close()
        procs.stop_all()
        client.flushdb()
        client.close()


def _waited(factory: sessionmaker[Session], shard_id: int) -> float:
    """Seconds since the shard was enqueued, by the database's clock (the one the reconciler's grace is read on)."""
    with factory() as session:
        return float(
            session.scalar(
                select(func.extract("epoch", func.now() - JobShard.enqueued_at)).where(JobShard.id == shard_id)
            )
            or 0.0
        )


def pool_size(app: Celery) -> int:
    stats = app.control.inspect(destination=[WORKER], timeout=2.0).stats() or {}
    return len(stats[WORKER]["pool"]["processes"])


def test_pool_resize_through_flower(stack: tuple[Settings, Processes, str, Celery]) -> None:
    _, _, url, app = stack
    assert pool_size(app) == 1
    assert call(f"{url}/api/worker/pool/grow/{WORKER}?n=2", "POST", auth=None)[0] == 401  # never open
    assert call(f"{url}/api/worker/pool/grow/{WORKER}?n=2", "POST", auth=("ops", "wrong-password-here"))[0] == 401
    status, body = call(f"{url}/api/worker/pool/grow/{WORKER}?n=2", "POST")
    assert status == 200, body
    wait_for(lambda: pool_size(app) == 3, 15, "the pool to grow to 3 processes")
    status, body = call(f"{url}/api/worker/pool/shrink/{WORKER}?n=1", "POST")
    assert status == 200, body
    wait_for(lambda: pool_size(app) == 2, 15, "the pool to shrink to 2 processes")
    assert call(f"{url}/api/worker/pool/shrink/{WORKER}?n=1", "POST")[0] == 200
    wait_for(lambda: pool_size(app) == 1, 15, "the pool back at 1 process (the worker is shared by this module)")


def test_revoking_a_waiting_shard_in_flower_skips_it_until_the_reconciler_brings_it_back(
    stack: tuple[Settings, Processes, str, Celery], clean_db: Engine, session_factory: sessionmaker[Session]
) -> None:
    settings, _, url, app = stack
    symbols = [f"V{i:02d}" for i in range(24)]
    seed_bars(clean_db, symbols, days=30)
    request = CalculationRequest(script=SLOW_SCRIPT, column_name="c", symbols=symbols)
    job = calculations.submit_calculation(session_factory, request, shard_size=4, enqueue=shard_enqueuer(app))
    with session_factory() as session:
        last = session.execute(
            select(JobShard.id, JobShard.task_id).where(JobShard.job_id == job.id).order_by(JobShard.index.desc())
        ).first()
    assert last is not None
    last_id, revoked_task = last

    assert call(f"{url}/api/task/revoke/{revoked_task}", "POST", auth=None)[0] == 401
    status, body = call(f"{url}/api/task/revoke/{revoked_task}", "POST")
    assert status == 200 and revoked_task in body["message"], body

    def others_done() -> bool:
        with session_factory() as session:
            rows = session.execute(select(JobShard.id, JobShard.status).where(JobShard.job_id == job.id)).all()
        return all(status == "succeeded" for shard_id, status in rows if shard_id != last_id)

    wait_for(others_done, 60, "the other shards")
    # The worker has taken the revoked message (it was the last one waiting) and discarded it: its task-revoked
    # event reached Flower, and the message is neither queued, unacknowledged, reserved nor running ...
    wait_for(lambda: (call(f"{url}/api/task/info/{revoked_task}")[1] or {}).get("state") == "REVOKED", 60,
             "the worker's task-revoked event in Flower")  # fmt: skip
    broker = redis.Redis.from_url(settings.require_redis_url())
    try:
        assert not broker_holds_task(broker, [QUEUE_INTERACTIVE], revoked_task)
    finally:
        broker.close()
    assert not worker_holds_task(app, revoked_task, [WORKER])
    with session_factory() as session:
        assert session.scalar(select(JobShard.status).where(JobShard.id == last_id)) == "queued"  # ... and skipped it
        assert session.scalar(select(Job.status).where(Job.id == job.id)) == "running"
    revoked = app.control.inspect(destination=[WORKER], timeout=2.0).revoked() or {}
    assert revoked_task in revoked.get(WORKER, [])

    # A queued shard is the reconciler's only once it has waited its grace; on a fast machine the rest of the job can
    # be done sooner than that.
    grace = settings.maintenance.reconcile_grace_s
    wait_for(lambda: _waited(session_factory, last_id) > grace, 30, "the revoked shard to have waited its grace")
    app.send_task(TASK_RECONCILE_SHARDS, queue=QUEUE_MAINTENANCE)  # what beat does every minute

    def finished() -> bool:
        with session_factory() as session:
            return session.scalar(select(Job.status).where(Job.id == job.id)) in FINAL

    wait_for(finished, 60, "the job to finish after the reconciler")
    with session_factory() as session:
        shard = session.get(JobShard, last_id)
        final = session.get(Job, job.id)
        assert shard is not None and final is not None
        assert shard.requeues == 1 and shard.task_id != revoked_task and shard.status == "succeeded"
        assert final.status == "succeeded" and final.symbols_done == len(symbols)
