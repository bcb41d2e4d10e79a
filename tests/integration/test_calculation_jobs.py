"""Calculation jobs end to end: Flask app -> PostgreSQL -> Redis -> a real Celery worker -> sandbox."""

from __future__ import annotations

import math
import subprocess
import time
from typing import Any

import psutil
import pytest
import redis
from flask.testing import FlaskClient
from sqlalchemy import Engine, func, select

from shared.contract import TASK_RUN_CALCULATION_SHARD, create_celery
from shared.infra.config import QUEUE_INTERACTIVE, Settings
from shared.infra.models import Job, JobResult, JobShard
from shared.sandbox.runner import probe_layers
from tests.helpers import (
    all_results,
    broker_holds_task,
    sandbox_processes,
    seed_bars,
    wait_for_job,
    wait_until,
    worker_holds_task,
)
from worker.sandbox_probe import publish_layers

pytestmark = pytest.mark.usefixtures("celery_worker")

SMA_SCRIPT = """
n = params["n"]
window = close[-n:]
sma = sum(window) / n
result = close[-1] / sma - 1
"""


def submit(client: FlaskClient, **body: Any) -> dict[str, Any]:
    response = client.post("/api/custom-calculations/execute", json=body)
    assert response.status_code == 202, response.json
    assert response.headers["Location"] == f"/api/jobs/{response.json['job_id']}"  # type: ignore[index]
    return response.json  # type: ignore[return-value]


def test_submit_poll_and_page_results_over_three_shards(client: FlaskClient, engine: Engine) -> None:
    symbols = [f"T{i:03d}" for i in range(120)]
    bars = seed_bars(engine, symbols)
    accepted = submit(client, script=SMA_SCRIPT, column_name="sma20_gap", stock_symbols=symbols, params={"n": 20})
    assert accepted["shards"] == 3 and accepted["symbols"] == 120 and accepted["status"] == "queued"

    job = wait_for_job(client, accepted["job_id"])
    assert job["status"] == "succeeded"
    assert job["progress"] == {
        "shards_total": 3, "shards_done": 3, "shards_failed": 0,
        "symbols_total": 120, "symbols_done": 120, "symbols_failed": 0, "percent": 100.0,
    }  # fmt: skip
    assert job["created_at"] <= job["started_at"] <= job["finished_at"]
    repro = job["reproducibility"]
    assert repro["symbol_count"] == 120 and repro["params"] == {"n": 20} and repro["shard_size"] == 50
    assert len(repro["script_sha256"]) == 64 and len(repro["symbols_sha256"]) == 64

    rows = all_results(client, accepted["job_id"], page_size=50)
    assert [r["symbol"] for r in rows] == sorted(symbols)
    for row in rows:
        closes = [b["close"] for b in bars[row["symbol"]]]
        expected = closes[-1] / (math.fsum(closes[-20:]) / 20) - 1
        assert row["error"] is None
        assert row["value"] == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_date_range_limits_the_bars_a_script_sees(client: FlaskClient, engine: Engine) -> None:
    bars = seed_bars(engine, ["AAA"], days=60)
    start, end = bars["AAA"][10]["date"], bars["AAA"][29]["date"]
    script = "result = len(close) + len(dates) / 1000 + (1 if dates[0] < dates[-1] else 0) / 10"
    accepted = submit(client, script=script, column_name="n", stock_symbols=["aaa"],
                      start_date=start.isoformat(), end_date=end.isoformat())  # fmt: skip
    assert wait_for_job(client, accepted["job_id"])["status"] == "succeeded"
    assert all_results(client, accepted["job_id"])[0]["value"] == pytest.approx(20 + 0.02 + 0.1)


def test_runtime_error_on_some_symbols_gives_partial_job(client: FlaskClient, engine: Engine) -> None:
    seed_bars(engine, ["GOOD1", "BAD1", "GOOD2", "BAD2"])
    script = "x = 1\nif symbol.startswith('BAD'):\n    x = close[0] / 0\nresult = close[-1]"
    accepted = submit(client, script=script, column_name="c", stock_symbols=["GOOD1", "BAD1", "GOOD2", "BAD2"])
    job = wait_for_job(client, accepted["job_id"])
    assert job["status"] == "partial"
    assert job["progress"]["symbols_failed"] == 2 and job["progress"]["symbols_done"] == 4
    rows = {r["symbol"]: r for r in all_results(client, accepted["job_id"])}
    for bad in ("BAD1", "BAD2"):
        assert rows[bad]["value"] is None
        assert rows[bad]["error"] == {"type": "ZeroDivisionError", "message": "float division by zero", "line": 3}
    assert rows["GOOD1"]["error"] is None and isinstance(rows["GOOD1"]["value"], float)


def test_unknown_symbol_and_no_bars_in_range_are_per_symbol_errors(client: FlaskClient, engine: Engine) -> None:
    seed_bars(engine, ["HAVE"], days=20)
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO symbols (symbol) VALUES ('EMPTY')")
    accepted = submit(client, script="result = close[-1]", column_name="c", stock_symbols=["HAVE", "EMPTY", "NOPE"])
    job = wait_for_job(client, accepted["job_id"])
    assert job["status"] == "partial"
    rows = {r["symbol"]: r for r in all_results(client, accepted["job_id"])}
    assert rows["HAVE"]["error"] is None
    assert rows["EMPTY"]["error"]["type"] == "NoData"
    assert rows["NOPE"]["error"] == {"type": "UnknownSymbol", "message": "unknown symbol NOPE", "line": None}


def test_timeout_on_one_symbol_spares_the_others(client: FlaskClient, engine: Engine, settings: Settings) -> None:
    seed_bars(engine, ["FAST1", "SLOW", "FAST2"], days=30)
    script = "if symbol == 'SLOW':\n    while True:\n        pass\nresult = len(close)"
    accepted = submit(client, script=script, column_name="c", stock_symbols=["FAST1", "SLOW", "FAST2"])
    job = wait_for_job(client, accepted["job_id"])
    assert job["status"] == "partial"
    rows = {r["symbol"]: r for r in all_results(client, accepted["job_id"])}
    assert rows["SLOW"]["error"]["type"] == "TimeoutError"
    assert f"{settings.sandbox.symbol_timeout_s:g} s" in rows["SLOW"]["error"]["message"]
    assert rows["FAST1"]["value"] == 30.0 and rows["FAST2"]["value"] == 30.0


def test_result_must_be_a_finite_number(client: FlaskClient, engine: Engine) -> None:
    symbols = ["R1", "R2", "R3", "R4", "R5", "R6"]
    seed_bars(engine, symbols, days=5)
    script = (
        "values = {'R1': None, 'R2': float('nan'), 'R3': 'text', 'R4': True, 'R5': 10 ** 400, 'R6': 7}\n"
        "result = values[symbol]"
    )
    job_id = submit(client, script=script, column_name="c", stock_symbols=symbols)["job_id"]
    assert wait_for_job(client, job_id)["status"] == "partial"
    rows = {r["symbol"]: r for r in all_results(client, job_id)}
    assert rows["R1"] == {"symbol": "R1", "value": None, "error": None}
    assert rows["R6"] == {"symbol": "R6", "value": 7.0, "error": None}
    assert rows["R2"]["error"]["type"] == "ValueError"
    assert rows["R3"]["error"]["type"] == "TypeError" and rows["R4"]["error"]["type"] == "TypeError"
    assert rows["R5"]["error"]["type"] == "OverflowError"


def test_hostile_error_messages_cost_only_their_symbol(client: FlaskClient, engine: Engine) -> None:
    seed_bars(engine, ["OK1", "NUL", "SUR", "BIG", "OK2"], days=5)
    script = (
        "if symbol == 'NUL':\n    raise ValueError('a\\x00b')\n"
        "if symbol == 'SUR':\n    raise ValueError('\\ud800')\n"
        "if symbol == 'BIG':\n    raise ValueError('x' * 10000000)\n"
        "result = 1"
    )
    job_id = submit(client, script=script, column_name="c", stock_symbols=["OK1", "NUL", "SUR", "BIG", "OK2"])["job_id"]
    assert wait_for_job(client, job_id)["status"] == "partial"
    rows = {r["symbol"]: r for r in all_results(client, job_id)}
    assert rows["OK1"]["value"] == 1.0 and rows["OK2"]["value"] == 1.0
    assert rows["NUL"]["error"]["message"] == "a\\x00b"
    assert rows["SUR"]["error"]["message"] == "\\ud800"
    assert rows["BIG"]["error"]["type"] == "ValueError" and len(rows["BIG"]["error"]["message"]) <= 2000


def test_duplicate_delivery_changes_nothing(
    client: FlaskClient, engine: Engine, settings: Settings, session_factory: Any
) -> None:
    symbols = [f"D{i:03d}" for i in range(60)]
    seed_bars(engine, symbols, days=40)
    celery = create_celery(settings)
    try:
        accepted = submit(client, script=SMA_SCRIPT, column_name="c", stock_symbols=symbols, params={"n": 5})
        with engine.connect() as conn:
            shard_ids = list(conn.scalars(select(JobShard.id).where(JobShard.job_id == accepted["job_id"])))
        # Deliver every shard twice more while the job runs, then once more after it finished.
        early = [
            celery.send_task(TASK_RUN_CALCULATION_SHARD, args=(shard_id,), ignore_result=False)
            for shard_id in shard_ids * 2
        ]
        job = wait_for_job(client, accepted["job_id"])
        late = [
            celery.send_task(TASK_RUN_CALCULATION_SHARD, args=(shard_id,), ignore_result=False)
            for shard_id in shard_ids
        ]
        assert [r.get(timeout=60) for r in late] == ["skipped", "skipped"]
        # The in-flight duplicates have settled too (whichever delivery stored a shard's rows, none failed).
        assert {r.get(timeout=90) for r in early} <= {"skipped", "stored", "duplicate"}
    finally:
        celery.close()
    after = client.get(f"/api/jobs/{accepted['job_id']}").json
    assert job["status"] == "succeeded" and after == job
    assert after["progress"]["shards_done"] == 2 and after["progress"]["symbols_done"] == 60
    with engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(JobResult)) == 60


def test_large_job_up_to_5000_symbols(client: FlaskClient, engine: Engine) -> None:
    seed_bars(engine, ["REAL1", "REAL2"], days=10)
    symbols = ["REAL1", "REAL2"] + [f"U{i:04d}" for i in range(4998)]
    accepted = submit(client, script="result = close[-1]", column_name="c", stock_symbols=symbols)
    assert accepted["shards"] == 100
    job = wait_for_job(client, accepted["job_id"], timeout_s=180)
    assert job["status"] == "partial"
    assert job["progress"]["symbols_done"] == 5000 and job["progress"]["symbols_failed"] == 4998


def test_cancel_keeps_finished_results_and_stops_the_rest(
    client: FlaskClient, engine: Engine, settings: Settings
) -> None:
    symbols = [f"C{i:03d}" for i in range(200)]
    seed_bars(engine, symbols, days=5)
    script = "s = 0\nfor i in range(300000):\n    s += i\nresult = close[-1]"
    job_id = submit(client, script=script, column_name="c", stock_symbols=symbols)["job_id"]
    response = client.post(f"/api/jobs/{job_id}/cancel")
    assert response.status_code == 200 and response.get_json()["status"] == "cancelled"

    # Shards already running finish; the rest must not start, even once the worker has taken their messages.
    def shard_rows() -> list[tuple[str, str]]:
        with engine.connect() as conn:
            return [(r.status, r.task_id) for r in conn.execute(select(JobShard.status, JobShard.task_id)
                                                                .where(JobShard.job_id == job_id))]  # fmt: skip

    wait_until(lambda: "running" not in {status for status, _ in shard_rows()}, 90, "the running shards to finish")
    task_ids = [task_id for _, task_id in shard_rows()]
    celery, broker = create_celery(settings), redis.Redis.from_url(settings.require_redis_url())
    try:
        wait_until(lambda: not any(broker_holds_task(broker, [QUEUE_INTERACTIVE], t) for t in task_ids), 90,
                   "the worker to take every message of the job off the broker")  # fmt: skip
        wait_until(lambda: not worker_holds_task(celery, task_ids), 30, "the worker to drop them")
    finally:
        celery.close()
        broker.close()
    with engine.connect() as conn:
        statuses = list(conn.scalars(select(JobShard.status).where(JobShard.job_id == job_id)))
        stored = conn.scalar(select(func.count()).select_from(JobResult).where(JobResult.job_id == job_id))
        assert conn.scalar(select(Job.status).where(Job.id == job_id)) == "cancelled"
    assert set(statuses) <= {"cancelled", "succeeded"} and statuses.count("cancelled") >= 2
    assert stored is not None and stored <= 100  # at most the two shards a 2-process worker had started
    assert client.post(f"/api/jobs/{job_id}/cancel").get_json()["status"] == "cancelled"


def test_health_reports_database_broker_and_workers(client: FlaskClient) -> None:
    response = client.get("/api/health")
    assert response.status_code == 200
    body = response.get_json()
    assert body["status"] == "ok"
    assert body["database"]["ok"] and body["broker"]["ok"] and body["workers"]["count"] >= 1
    # Each live worker published the sandbox layers its host applies (probed at worker start).
    sandbox = body["sandbox"]
    assert sandbox["ok"] and sandbox["inactive"] == []
    for name in body["workers"]["names"]:
        assert sandbox["workers"][name]["layers"] == {
            "network_namespace": True, "no_new_privs": True, "unprivileged_uid": True, "seccomp": True,
        }  # fmt: skip


def test_health_is_degraded_while_a_worker_lacks_a_sandbox_layer(client: FlaskClient, settings: Settings) -> None:
    name = client.get("/api/health").get_json()["workers"]["names"][0]
    real = probe_layers(settings.sandbox)
    try:
        publish_layers(settings, name, {**real, "seccomp": False})  # as a host without libseccomp reports it
        body = client.get("/api/health").get_json()
        assert body["status"] == "degraded" and body["sandbox"]["inactive"] == [f"{name}: seccomp"]
    finally:
        publish_layers(settings, name, real)
    assert client.get("/api/health").get_json()["status"] == "ok"


def test_shard_of_a_killed_pool_process_is_delivered_again(
    client: FlaskClient, engine: Engine, celery_worker: subprocess.Popen[bytes]
) -> None:
    symbols = [f"K{i:03d}" for i in range(100)]
    seed_bars(engine, symbols, days=5)
    script = "s = 0\nfor i in range(400000):\n    s += i\nresult = close[-1]"
    job_id = submit(client, script=script, column_name="c", stock_symbols=symbols)["job_id"]

    victim = None
    deadline = time.monotonic() + 30
    while victim is None and time.monotonic() < deadline:
        for pool_process in psutil.Process(celery_worker.pid).children():
            if sandbox_processes(pool_process.pid)[1]:
                victim = pool_process
                break
        time.sleep(0.05)
    assert victim is not None, "no pool process was running a sandbox"
    victim.kill()  # SIGKILL mid-shard: the sandbox dies with it (PDEATHSIG), the message is re-queued

    job = wait_for_job(client, job_id, timeout_s=120)
    assert job["status"] == "succeeded" and job["progress"]["symbols_done"] == 100
    with engine.connect() as conn:
        attempts = sorted(conn.scalars(select(JobShard.attempts).where(JobShard.job_id == job_id)))
    assert attempts[-1] >= 2  # the killed shard ran again
    assert {r["error"] is None for r in all_results(client, job_id)} == {True}
