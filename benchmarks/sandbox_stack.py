"""The sandbox benchmark's end-to-end part (benchmarks/sandbox_overhead.py, figure 3): the real API and one Celery
worker on a fresh database, the trivial one-symbol job against its floor, and interactive ``/try`` round trips."""

from __future__ import annotations

import datetime as dt
import os
import secrets
import statistics
import time
from typing import Any

from benchmarks.calc_throughput import PASSWORD, TOKEN, http, wait_http
from benchmarks.stack import bench_stack
from shared.accounts import users
from shared.contract import create_celery
from shared.infra.config import QUEUE_INTERACTIVE, Settings
from shared.infra.db import make_engine, make_session_factory, session_scope
from shared.marketdata.demo import load_demo_universe
from shared.ops.embedded import free_tcp_port
from shared.ops.launcher import child_commands

FINAL = {"succeeded", "partial", "failed", "cancelled"}
POLL_S = 0.002  # the poller asks every 2 ms: what it sees is the system's latency, not its own interval


def _trivial_job(base: str, symbol: str, parts: list[dict[str, float]] | None = None) -> float:
    """Seconds from submitting a one-symbol job to a poller seeing it final; ``parts`` gets where the time went
    (the POST, then from the job's own timestamps: queued -> started, started -> finished, finished -> seen)."""
    began = time.perf_counter()
    accepted = http("POST", f"{base}/custom-calculations/execute", {
        "script": "result = close[-1]", "column_name": "last", "stock_symbols": [symbol],
    })  # fmt: skip
    posted = time.perf_counter()
    while (job := http("GET", f"{base}/jobs/{accepted['job_id']}"))["status"] not in FINAL:
        time.sleep(POLL_S)
    seen = time.perf_counter()
    if parts is not None:
        created, started, finished = (dt.datetime.fromisoformat(job[k]) for k in ("created_at", "started_at",
                                                                                   "finished_at"))  # fmt: skip
        parts.append({"post": posted - began, "queued": (started - created).total_seconds(),
                      "running": (finished - started).total_seconds(), "total": seen - began})  # fmt: skip
    return seen - began


def _celery_round_trip(app: Any) -> float:
    began = time.perf_counter()
    app.send_task("celery.backend_cleanup", queue=QUEUE_INTERACTIVE, ignore_result=False).get(timeout=30)
    return time.perf_counter() - began


def _try_round_trip(base: str, symbol: str) -> float:
    began = time.perf_counter()
    answer = http("POST", f"{base}/custom-calculations/try", {"script": "print(symbol)\nresult = close[-1]",
                                                              "symbol": symbol})  # fmt: skip
    assert answer.get("error") is None, answer
    return time.perf_counter() - began


def trivial_jobs(count: int, start_p50: float) -> None:
    with bench_stack("sandbox") as stack:
        engine = make_engine(stack.database_url, pool_size=1)
        load_demo_universe(engine, symbols=1, years=1, seed=1)
        with engine.connect() as conn:
            symbol = str(conn.exec_driver_sql("SELECT symbol FROM symbols LIMIT 1").scalar_one())
        with session_scope(make_session_factory(engine)) as session:
            users.create_user(session, "bench", PASSWORD)
        engine.dispose()
        port = free_tcp_port()
        settings = Settings.from_env().with_overrides(
            database_url=stack.database_url, redis_url=stack.redis_url, data_dir=stack.work, api_port=port
        )
        env = {
            **os.environ,
            **settings.child_env(),
            "JWT_SECRET_KEY": secrets.token_urlsafe(48),
            "ALPHAFORGE_RATE_LIMIT_SUBMIT": "100000/minute",
        }  # fmt: skip  (hundreds of jobs a minute here)
        commands = dict(child_commands(settings))
        for name in ("worker", "api"):
            stack.spawn(commands[name], env)
        base = f"http://127.0.0.1:{port}/api"
        wait_http(f"{base}/health")
        TOKEN["access"] = http("POST", f"{base}/auth/login", {"username": "bench", "password": PASSWORD})[
            "access_token"
        ]
        app = create_celery(settings, set_as_current=False)
        for _ in range(5):  # warm: connections, the pool processes' zygotes
            _trivial_job(base, symbol)
            _celery_round_trip(app)
        parts: list[dict[str, float]] = []
        jobs = [_trivial_job(base, symbol, parts) for _ in range(count)]
        trips = [_celery_round_trip(app) for _ in range(count)]
        job_p50, trip_p50 = statistics.median(jobs), statistics.median(trips)
        floor = trip_p50 + start_p50
        print(f"\n3. the trivial one-symbol job, submit -> final status seen by a poller ({count} jobs, poll every "
              f"{1e3 * POLL_S:g} ms)")  # fmt: skip
        print(f"   p50 {1e3 * job_p50:.1f} ms (goal <= 25 ms)   p90 {1e3 * sorted(jobs)[int(0.9 * count)]:.1f} ms")
        where = {k: 1e3 * statistics.median(p[k] for p in parts) for k in ("post", "queued", "running")}
        print(f"   where it goes (p50): the POST {where['post']:.1f} ms; queued -> started {where['queued']:.1f} ms, "
              f"started -> finished {where['running']:.1f} ms (the job's timestamps); the rest is polling")  # fmt: skip
        print(f"   floor: Celery round trip p50 {1e3 * trip_p50:.1f} ms + sandbox start p50 {1e3 * start_p50:.2f} ms "
              f"= {1e3 * floor:.1f} ms   ratio job / floor {job_p50 / floor:.2f}x   (goal <= 1.5x)")  # fmt: skip
        try:
            tries = [_try_round_trip(base, symbol) for _ in range(count)]
        except OSError as exc:  # the endpoint is not there (an older checkout)
            print(f"   /try: not measured ({exc})")
        else:
            print(f"   /try round trip p50 {1e3 * statistics.median(tries):.1f} ms")
        app.close()
