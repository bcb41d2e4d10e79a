"""The sandbox zygote under a real Celery worker: state a script changes reaches no other job or user, a killed
zygote costs no job, and a storm of shards never runs more sandbox children than the worker's concurrency."""

from __future__ import annotations

import contextlib
import subprocess
import threading

import psutil
import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import Engine

from shared.contract import shard_enqueuer
from shared.infra.config import Settings
from shared.jobs.calculations import CalculationRequest, submit_calculation
from tests.helpers import ApiUser, all_results, sandbox_processes, seed_bars, wait_for_job, wait_until
from tests.integration.test_calculation_jobs import submit

pytestmark = pytest.mark.usefixtures("celery_worker")

# Every way a script might try to leave something behind for the next one (each refused, or local to its globals).
POISON = """
try:
    math.pi = 3
except Exception:
    pass
import ta
import statistics
for target in (ta, statistics, math):
    try:
        target.poison = 1
    except Exception:
        pass
len = lambda x: 0
result = 0.0
"""

CHECK = """
import ta
import statistics
ok = math.pi == 3.141592653589793 and ta.sma((1.0, 3.0), 2)[1] == 2.0 and len((1, 2)) == 2
ok = ok and statistics.mean([1.0, 5.0]) == 3.0 and close[-1] > 0
result = 1.0 if ok else -1.0
"""


def test_what_one_job_does_reaches_no_later_job_or_user(
    client: FlaskClient, other_client: FlaskClient, engine: Engine
) -> None:
    symbols = [f"Z{i:02d}" for i in range(4)]
    seed_bars(engine, symbols, days=30)
    poisoned = wait_for_job(client, submit(client, script=POISON, column_name="p", stock_symbols=symbols)["job_id"])
    assert poisoned["status"] == "succeeded"
    for who in (client, other_client):  # the same user's next job, and another user's
        job = wait_for_job(who, submit(who, script=CHECK, column_name="c", stock_symbols=symbols)["job_id"])
        assert job["status"] == "succeeded"
        assert {r["value"] for r in all_results(who, job["job_id"])} == {1.0}


def test_a_zygote_killed_mid_job_costs_no_job(
    client: FlaskClient, engine: Engine, celery_worker: subprocess.Popen[bytes]
) -> None:
    symbols = [f"Y{i:02d}" for i in range(6)]
    seed_bars(engine, symbols, days=30)
    script = "s = 0\nfor i in range(1500000):\n    s += i\nresult = close[-1]"
    job_id = submit(client, script=script, column_name="slow", stock_symbols=symbols)["job_id"]

    def busy_zygote() -> psutil.Process | None:
        zygotes, children = sandbox_processes(celery_worker.pid)
        parents = set()
        for child in children:
            with contextlib.suppress(psutil.Error):
                parents.add(child.ppid())
        return next((z for z in zygotes if z.pid in parents), None)

    victim = wait_until(busy_zygote, 60, "a zygote with a child at work")
    assert victim is not None
    victim.kill()
    job = wait_for_job(client, job_id, timeout_s=120)
    assert job["status"] == "succeeded" and job["progress"]["symbols_failed"] == 0
    results = all_results(client, job_id)
    assert len(results) == 6 and all(r["error"] is None and r["value"] > 0 for r in results)
    wait_until(lambda: len(sandbox_processes(celery_worker.pid)[0]) == 2, 60, "a new zygote beside the other")


def test_a_storm_of_shards_is_bounded_by_the_worker_s_concurrency(
    flask_app: Flask, client: FlaskClient, user: ApiUser, engine: Engine, settings: Settings,
    celery_worker: subprocess.Popen[bytes],
) -> None:  # fmt: skip
    symbols = [f"W{i:03d}" for i in range(300)]
    seed_bars(engine, symbols, days=10)
    services = flask_app.extensions["alphaforge"]
    script = "s = 0\nfor i in range(20000):\n    s += i\nresult = close[-1]"  # a few ms: children to see
    request = CalculationRequest(script=script, column_name="w", symbols=symbols, owner_id=user.id)
    most = {"children": 0}
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            most["children"] = max(most["children"], len(sandbox_processes(celery_worker.pid)[1]))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        job = submit_calculation(services.session_factory, request, shard_size=1,
                                 enqueue=shard_enqueuer(services.celery))  # fmt: skip
        assert job.shards_total == 300
        final = wait_for_job(client, str(job.id), timeout_s=180)
    finally:
        done.set()
        watcher.join()
    assert final["status"] == "succeeded" and final["progress"]["symbols_done"] == 300
    assert 1 <= most["children"] <= settings.worker_concurrency, most
