"""Faults survived, with real processes: the broker (a Redis of the test's own) restarts in the middle of a
40-shard job; the worker reconnects, the reconciler covers what the restart lost, the job finishes with every
symbol stored exactly once. And a longer outage that the worker and beat processes ride out without dying."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import redis
from celery import Celery
from kombu.exceptions import OperationalError as KombuOperationalError
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session, sessionmaker

from shared.contract import create_celery, shard_enqueuer
from shared.infra.config import Maintenance, Settings
from shared.infra.models import Job, JobResult
from shared.jobs import calculations
from shared.jobs.calculations import CalculationRequest
from shared.ops.embedded import EmbeddedRedis
from tests.helpers import FINAL, seed_bars
from tests.integration.test_faults_worker_kill import SCRIPT, Processes, shard_statuses, wait_for

pytestmark = pytest.mark.slow  # scheduled first (tests/conftest.py)

SYMBOLS = 200
SHARD_SIZE = 5


@pytest.fixture
def own_redis() -> Iterator[EmbeddedRedis]:
    data_dir = Path(tempfile.mkdtemp(prefix="af-redis-", dir="/tmp"))
    server = EmbeddedRedis(data_dir)
    server.start()
    yield server
    server.stop()
    shutil.rmtree(data_dir, ignore_errors=True)


def test_job_survives_a_broker_restart(
    clean_db: Engine, session_factory: sessionmaker[Session], settings: Settings, own_redis: EmbeddedRedis
) -> None:
    fault = settings.with_overrides(
        redis_url=f"redis://127.0.0.1:{own_redis.port}/0",
        shard_size=SHARD_SIZE,
        maintenance=replace(Maintenance(), reconcile_interval_s=1.0, reconcile_grace_s=3.0, nightly_schedule="off"),
    )
    symbols = [f"R{i:03d}" for i in range(SYMBOLS)]
    seed_bars(clean_db, symbols, days=30)
    processes = Processes(fault)
    app = create_celery(fault)
    try:
        processes.start("redis-worker", "worker", "--hostname", "redis-fault@%h", "--concurrency", "2")
        processes.start("redis-beat", "beat")
        wait_for(lambda: app.control.ping(timeout=0.5), 60, "the worker")
        request = CalculationRequest(script=SCRIPT, column_name="c", symbols=symbols)
        job = calculations.submit_calculation(session_factory, request, shard_size=SHARD_SIZE,
                                              enqueue=shard_enqueuer(app))  # fmt: skip
        wait_for(lambda: shard_statuses(session_factory, job.id).count("succeeded") >= 4, 60, "the job to be going")

        own_redis.stop()  # SIGTERM: Redis writes its append-only file and exits
        restarted_at = time.monotonic()
        time.sleep(2.0)  # the worker and beat lose their connections meanwhile
        assert shard_statuses(session_factory, job.id).count("succeeded") < 40
        own_redis.start()  # same port, same data directory: the queues come back from the AOF

        def finished() -> bool:
            with session_factory() as session:
                return session.scalar(select(Job.status).where(Job.id == job.id)) in FINAL

        wait_for(finished, 120, "the job to finish after the restart")
        recovered_s = time.monotonic() - restarted_at
    finally:
        app.close()
        processes.stop_all()
    with session_factory() as session:
        final = session.get(Job, job.id)
        stored = session.execute(
            select(JobResult.symbol, func.count()).where(JobResult.job_id == job.id).group_by(JobResult.symbol)
        ).all()
    assert final is not None and final.status == "succeeded", final and final.error
    assert (final.shards_done, final.symbols_done, final.symbols_failed) == (40, SYMBOLS, 0)
    assert sorted(s for s, _ in stored) == symbols and {n for _, n in stored} == {1}
    print(f"\n[fault] broker restart (2 s down) mid-job: finished {recovered_s:.1f} s after the stop")


def _answers(app: Celery) -> bool:
    """A worker answers a ping (the test's own connection to Redis may be one the restart broke: try again)."""
    try:
        return bool(app.control.ping(timeout=0.5))
    except (OSError, redis.RedisError, KombuOperationalError):
        return False


def _beat_runs(client: redis.Redis, entry: str = "reconcile-shards") -> int:
    """How often beat has fired ``entry`` (celery-redbeat's run counter, kept in Redis with the entry)."""
    meta = client.hget(f"alphaforge:redbeat:{entry}", "meta")
    # an entry saved but not fired yet has a meta of its last_run_at only (redbeat's save, reschedule): no runs
    return int(json.loads(meta).get("total_run_count", 0)) if meta else 0


def test_worker_and_beat_ride_out_a_long_redis_outage(settings: Settings, own_redis: EmbeddedRedis) -> None:
    """Redis down for 6 s (beat's tick and lock renewal fail every second meanwhile, the worker's reconnects too):
    the same worker and beat processes carry on afterwards, and beat keeps firing its 1 s reconciler entry."""
    fault = settings.with_overrides(
        redis_url=f"redis://127.0.0.1:{own_redis.port}/0",
        maintenance=replace(Maintenance(), reconcile_interval_s=1.0, nightly_schedule="off"),
    )
    processes = Processes(fault)
    app = create_celery(fault)
    client = redis.Redis.from_url(fault.require_redis_url(), socket_timeout=2)
    try:
        worker = processes.start("outage-worker", "worker", "--hostname", "outage@%h", "--concurrency", "1")
        beat = processes.start("outage-beat", "beat", "--schedule", str(fault.data_dir / "outage-beat-schedule"))
        wait_for(lambda: app.control.ping(timeout=0.5), 60, "the worker")
        wait_for(lambda: _beat_runs(client) >= 2, 60, "beat to fire the reconciler")

        own_redis.stop()
        time.sleep(6.0)  # the outage itself (not a wait for a result)
        assert worker.poll() is None and beat.poll() is None, processes.log("outage-beat")[-3000:]
        own_redis.start()  # same port, same append-only file
        back_at = time.monotonic()
        runs_before = _beat_runs(client)

        wait_for(lambda: _beat_runs(client) >= runs_before + 2, 60, "beat to fire again after the outage")
        beat_s = time.monotonic() - back_at
        wait_for(lambda: _answers(app), 60, "the worker to answer again")
        worker_s = time.monotonic() - back_at
        assert worker.poll() is None and beat.poll() is None  # the same processes: nothing died
        assert "Redis unavailable" in processes.log("outage-beat")
    finally:
        client.close()
        app.close()
        processes.stop_all()
    print(f"\n[fault] Redis down 6 s: beat firing again {beat_s:.1f} s and the worker answering {worker_s:.1f} s "
          "after it came back (same pids)")  # fmt: skip
