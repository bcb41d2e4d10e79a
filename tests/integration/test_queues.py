"""Queues and fairness with the real worker (2 pool processes): a user's small job does not wait behind a nightly
flood, nor behind another user's big job, for more than about one shard's time."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest
from celery import Celery
from flask.testing import FlaskClient
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session, sessionmaker

from shared.contract import create_celery, shard_enqueuer
from shared.infra.config import QUEUE_BULK, QUEUE_INTERACTIVE, Settings
from shared.infra.models import Job, JobShard
from shared.jobs import calculations
from shared.jobs import pipeline as jobs
from shared.jobs.calculations import CalculationRequest
from shared.jobs.fairness import shard_priority
from tests.helpers import ApiUser, seed_bars, wait_for_job

pytestmark = pytest.mark.usefixtures("celery_worker")

BIG_SHARDS = 40
SHARD_SIZE = 5
SLOW_SCRIPT = "s = 0\nfor i in range(400000):\n    s += i\nresult = close[-1]"  # about 0.15 s per symbol


@pytest.fixture
def celery_app(settings: Settings) -> Iterator[Celery]:
    app = create_celery(settings)
    yield app
    app.close()


def test_priorities_put_interactive_first_and_each_jobs_first_shards_on_top() -> None:
    interactive = [shard_priority(i, QUEUE_INTERACTIVE) for i in range(100)]
    bulk = [shard_priority(i, QUEUE_BULK) for i in range(100)]
    assert interactive[:8] == [0, 1, 1, 2, 2, 2, 2, 3] and max(interactive) == 4
    assert bulk[0] == 5 and max(bulk) == 9 and max(interactive) < min(bulk)


def submit_big(factory: sessionmaker[Session], app: Celery, owner_id: str, symbols: list[str], queue: str) -> Job:
    request = CalculationRequest(script=SLOW_SCRIPT, column_name="c", symbols=symbols, owner_id=owner_id, queue=queue)
    return calculations.submit_calculation(
        factory, request, shard_size=SHARD_SIZE, enqueue=shard_enqueuer(app, queue=queue)
    )


def shard_counts(factory: sessionmaker[Session], job_id: uuid.UUID) -> dict[str, int]:
    with factory() as session:
        rows = session.execute(
            select(JobShard.status, func.count()).where(JobShard.job_id == job_id).group_by(JobShard.status)
        ).all()
    return {status: n for status, n in rows}


def mean_shard_seconds(factory: sessionmaker[Session], job_id: uuid.UUID) -> float:
    with factory() as session:
        value = session.scalar(
            select(func.avg(func.extract("epoch", JobShard.finished_at - JobShard.started_at))).where(
                JobShard.job_id == job_id, JobShard.status == "succeeded"
            )
        )
    assert value is not None
    return float(value)


def wait_until_busy(factory: sessionmaker[Session], job_id: uuid.UUID) -> None:
    deadline = time.monotonic() + 30
    while shard_counts(factory, job_id).get("succeeded", 0) < 2 or shard_counts(factory, job_id).get("running", 0) < 2:
        assert time.monotonic() < deadline, shard_counts(factory, job_id)
        time.sleep(0.05)


def small_job_wait(client: FlaskClient, symbols: list[str]) -> float:
    started = time.monotonic()
    body = {"script": "result = close[-1]", "column_name": "c", "stock_symbols": symbols}
    response = client.post("/api/custom-calculations/execute", json=body)
    assert response.status_code == 202, response.json
    job = wait_for_job(client, response.json["job_id"], timeout_s=60)  # type: ignore[index]
    assert job["status"] == "succeeded"
    return time.monotonic() - started


@pytest.mark.parametrize("big_queue", [QUEUE_BULK, QUEUE_INTERACTIVE], ids=["nightly-flood", "other-users-big-job"])
def test_a_small_job_waits_about_one_shard_behind_a_big_one(
    big_queue: str,
    client: FlaskClient,
    other_user: ApiUser,
    engine: Engine,
    session_factory: sessionmaker[Session],
    celery_app: Celery,
) -> None:
    big_symbols = [f"B{i:03d}" for i in range(BIG_SHARDS * SHARD_SIZE)]
    small_symbols = [f"S{i:02d}" for i in range(10)]
    seed_bars(engine, big_symbols + small_symbols, days=30)
    big = submit_big(session_factory, celery_app, other_user.id, big_symbols, big_queue)
    try:
        wait_until_busy(session_factory, big.id)  # both pool processes are on the big job, 38 shards wait
        waited = small_job_wait(client, small_symbols)
        left = BIG_SHARDS - shard_counts(session_factory, big.id).get("succeeded", 0)
        shard_s = mean_shard_seconds(session_factory, big.id)
    finally:
        _, task_ids = jobs.cancel_job(session_factory, big.id)
        celery_app.control.revoke(task_ids)
        # The shards still running finish (cancel keeps them): wait, so that the next test's TRUNCATE does not
        # meet their transactions (a lock-order deadlock between TRUNCATE and a finishing shard).
        deadline = time.monotonic() + 30
        while shard_counts(session_factory, big.id).get("running", 0) and time.monotonic() < deadline:
            time.sleep(0.1)
    print(f"\n[queues] small job behind a {big_queue} job of {BIG_SHARDS} shards: finished {waited:.2f} s after "
          f"submission; one big shard takes {shard_s:.2f} s; {left} big shards still to run (FIFO would have "
          f"waited ~{left * shard_s / 2:.1f} s)")  # fmt: skip
    assert left >= BIG_SHARDS // 2  # it jumped the queue ...
    assert waited < 2 * shard_s + 1.5  # ... waiting for about one running shard to end, plus its own run
