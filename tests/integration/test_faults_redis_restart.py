"""Faults survived, with real processes: the broker (a Redis of the test's own) restarts in the middle of a
40-shard job; the worker reconnects, the reconciler covers what the restart lost, the job finishes with every
symbol stored exactly once."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session, sessionmaker

from shared import calculations
from shared.calculations import CalculationRequest
from shared.config import Maintenance, Settings
from shared.embedded import EmbeddedRedis
from shared.models import Job, JobResult
from tests.helpers import FINAL, seed_bars
from tests.integration.test_faults_worker_kill import SCRIPT, Processes, shard_statuses, wait_for
from worker.celery_app import create_celery, shard_enqueuer

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
