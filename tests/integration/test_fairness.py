"""Per-user fairness with the real worker (2 pool processes): a user who floods the interactive queue with several
big jobs delays another user's small job by about one shard (one per busy user), not one per busy job."""

from __future__ import annotations

import datetime as dt
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
from shared.jobs.fairness import shard_level, shard_priority
from tests.helpers import ApiUser, seed_bars, wait_for_job

FLOOD_JOBS = 4
FLOOD_SHARDS = 20
SHARD_SIZE = 5
SLOW_SCRIPT = "s = 0\nfor i in range(400000):\n    s += i\nresult = close[-1]"  # about 0.15 s per symbol


def test_a_users_later_jobs_start_lower_and_the_bands_never_mix() -> None:
    assert [shard_level(0, load) for load in range(6)] == [0, 1, 2, 3, 4, 4]
    assert [shard_level(i, 1) for i in range(4)] == [1, 2, 2, 3]
    for load in range(10):
        interactive = {shard_priority(i, QUEUE_INTERACTIVE, load) for i in range(200)}
        bulk = {shard_priority(i, QUEUE_BULK, load) for i in range(200)}
        assert max(interactive) <= 4 < 5 <= min(bulk) and max(bulk) <= 9


@pytest.fixture
def celery_app(settings: Settings) -> Iterator[Celery]:
    app = create_celery(settings)
    yield app
    app.close()


def _shard_times(factory: sessionmaker[Session], job_ids: list[uuid.UUID]) -> list[tuple[str, dt.datetime | None]]:
    with factory() as session:
        rows = session.execute(select(JobShard.status, JobShard.started_at).where(JobShard.job_id.in_(job_ids)))
        return [(status, started) for status, started in rows]


@pytest.mark.usefixtures("celery_worker")
def test_a_flooding_user_delays_another_users_small_job_by_about_one_shard(
    client: FlaskClient,
    other_user: ApiUser,
    engine: Engine,
    session_factory: sessionmaker[Session],
    celery_app: Celery,
) -> None:
    flood_symbols = [f"A{i:03d}" for i in range(FLOOD_SHARDS * SHARD_SIZE)]
    small_symbols = [f"S{i:02d}" for i in range(10)]
    seed_bars(engine, flood_symbols + small_symbols, days=30)
    flood: list[Job] = []
    try:
        for _ in range(FLOOD_JOBS):  # user A submits four big jobs back to back (each with the same owner)
            request = CalculationRequest(script=SLOW_SCRIPT, column_name="c", symbols=flood_symbols,
                                         owner_id=other_user.id)  # fmt: skip
            flood.append(calculations.submit_calculation(session_factory, request, shard_size=SHARD_SIZE,
                                                         enqueue=shard_enqueuer(celery_app)))  # fmt: skip
        flood_ids = [j.id for j in flood]
        deadline = time.monotonic() + 30
        while sum(1 for status, _ in _shard_times(session_factory, flood_ids) if status == "running") < 2:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        with session_factory() as session:
            submitted_at = session.scalar(select(func.now()))
        started = time.monotonic()
        body = {"script": "result = close[-1]", "column_name": "c", "stock_symbols": small_symbols}
        response = client.post("/api/custom-calculations/execute", json=body)  # user B: one 10-symbol shard
        assert response.status_code == 202, response.json
        small = wait_for_job(client, response.json["job_id"], timeout_s=60)  # type: ignore[index]
        waited_s = time.monotonic() - started
        assert small["status"] == "succeeded"
        with session_factory() as session:
            small_started = session.scalar(
                select(func.min(JobShard.started_at)).where(JobShard.job_id == uuid.UUID(small["job_id"]))
            )
            shard_s = session.scalar(
                select(func.avg(func.extract("epoch", JobShard.finished_at - JobShard.started_at))).where(
                    JobShard.job_id.in_(flood_ids), JobShard.status == "succeeded"
                )
            )
        assert small_started is not None and submitted_at is not None
        flood_shards = _shard_times(session_factory, flood_ids)
        jumped_ahead = sum(1 for _, at in flood_shards if at is not None and submitted_at < at < small_started)
        waiting = sum(1 for status, _ in flood_shards if status in ("queued",))
    finally:
        for job in flood:
            _, task_ids = jobs.cancel_job(session_factory, job.id)
            celery_app.control.revoke(task_ids)
        deadline = time.monotonic() + 30  # running shards finish (cancel keeps them): let them, before TRUNCATE
        while any(s == "running" for s, _ in _shard_times(session_factory, [j.id for j in flood])):
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
    print(f"\n[fairness] user A: {FLOOD_JOBS} jobs x {FLOOD_SHARDS} shards; user B's 10-symbol job started after "
          f"{jumped_ahead} of A's shards started, finished {waited_s:.2f} s after submission (one A shard: "
          f"{shard_s or 0:.2f} s; {waiting} A shards still queued at the end)")  # fmt: skip
    assert jumped_ahead <= 1  # about one shard per busy user (per-job interleaving alone let up to 4 go first)
    assert waiting >= FLOOD_JOBS * FLOOD_SHARDS // 2  # B did not wait for the flood
