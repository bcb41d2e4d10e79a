"""API under load: many clients submitting small jobs and polling them, and a trivial job's latency against its floor.

    .venv/bin/python -m benchmarks.api_load [--clients 200] [--duration 30] [--users 20]

Starts embedded PostgreSQL and Redis (unless ALPHAFORGE_BENCH_DATABASE_URL / ALPHAFORGE_BENCH_REDIS_URL name
servers), a fresh database with a small synthetic universe, the API exactly as ``up`` starts it (gunicorn, threaded
workers) and one Celery worker (ALPHAFORGE_WORKER_CONCURRENCY, default 2). Rate limits and the active-jobs quota
are raised for the run (they would otherwise answer 429 by design); logs at WARNING.

1. Load: ``--clients`` threads, each logged in as one of ``--users`` accounts, submit a one-symbol job, poll it
   every 50 ms until it is final, and start again, for ``--duration`` seconds. Printed: requests, errors (any
   non-2xx answer or failed request; goal 0), submit and poll latency p50/p99, jobs/s.
2. Latency of a trivial one-symbol job, submit -> finished status seen by a client polling every 2 ms over a
   kept-alive connection, against its floor measured in the same run: one bare Celery task round trip on the same
   broker (``celery.accumulate``, result over the Redis backend) plus one sandbox process start (the same runner the
   worker uses, one symbol). Goal: at most 2x the floor.
3. The API's CPU cost per request, from the API processes' own counters (psutil: user + system time of the gunicorn
   master and its workers), one kind at a time: 16 clients polling one finished job for 5 s, then 16 clients
   submitting one-symbol jobs for 5 s. Unlike latencies, these figures do not depend on what else competes for the
   machine's cores, so capacity can be read from them (one core serves 1000 / ms requests a second).
4. The view of a just-finished job, one kind after the other, each job polled on its own view every 20 ms; the
   latency of the first ``GET`` that sees it final (p50, p99): a view only reads rows, the worker that finished the
   job stored what it shows in the transaction that made it final. ``--run-samples`` backtest runs of every symbol
   with validation (``GET /api/runs/<id>``), then ``--optimization-samples`` small dual-SMA optimisations of one
   symbol (``GET /api/optimizations/<id>``).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import secrets
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psutil
from sqlalchemy import text

from benchmarks.stack import bench_stack
from shared.accounts import users
from shared.contract import create_celery
from shared.infra.config import Settings
from shared.infra.db import make_engine, make_session_factory, session_scope
from shared.marketdata.bars import load_bars
from shared.marketdata.demo import load_demo_universe
from shared.ops.embedded import free_tcp_port
from shared.ops.launcher import child_commands
from shared.sandbox.runner import run_script

FINAL = {"succeeded", "partial", "failed", "cancelled"}
SCRIPT = "result = close[-1] / close[0] - 1"
PASSWORD = "benchmark passphrase"


class Client:
    """One kept-alive HTTP connection with a bearer token."""

    def __init__(self, port: int, token: str) -> None:
        self.port = port
        self.headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
        data = json.dumps(body) if body is not None else None
        for attempt in (1, 2):
            try:
                self.conn.request(method, path, body=data, headers=self.headers)
                response = self.conn.getresponse()
                return response.status, json.loads(response.read() or b"{}")
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.conn.close()  # the server closed a kept-alive connection: reconnect once
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")


@dataclass
class Tally:
    submit: list[float] = field(default_factory=list)
    poll: list[float] = field(default_factory=list)
    jobs: int = 0
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] if ordered else float("nan")


def load_client(port: int, token: str, symbol: str, until: float, tally: Tally) -> None:
    client = Client(port, token)
    submit: list[float] = []
    poll: list[float] = []
    jobs = 0
    errors: list[str] = []
    while time.monotonic() < until:
        try:
            began = time.perf_counter()
            job_body = {"script": SCRIPT, "column_name": "c", "stock_symbols": [symbol]}
            status, body = client.request("POST", "/api/custom-calculations/execute", job_body)
            submit.append(time.perf_counter() - began)
            if status != 202:
                errors.append(f"submit {status}: {body.get('error', {}).get('code')}")
                continue
            while True:
                time.sleep(0.05)
                began = time.perf_counter()
                status, job = client.request("GET", f"/api/jobs/{body['job_id']}")
                poll.append(time.perf_counter() - began)
                if status != 200:
                    errors.append(f"poll {status}")
                    break
                if job["status"] in FINAL:
                    jobs += 1
                    if job["status"] != "succeeded":
                        errors.append(f"job {job['status']}")
                    break
        except Exception as exc:  # a failed request is an error of the run, not of the benchmark
            errors.append(f"{type(exc).__name__}: {exc}")
            client = Client(port, token)
    with tally.lock:
        tally.submit += submit
        tally.poll += poll
        tally.jobs += jobs
        tally.errors += errors


def api_cpu_s(api: psutil.Process) -> float:
    """CPU seconds (user + system) the API has used so far: the gunicorn master and its worker processes."""
    total = 0.0
    for proc in [api, *api.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            times = proc.cpu_times()
            total += times.user + times.system
    return total


def cpu_per_request(
    api: psutil.Process, make_client: Callable[[], Client], clients: int, seconds: float, one: Callable[[Client], int]
) -> tuple[float, int]:
    """(ms of the API's CPU per request, requests): ``clients`` threads doing only ``one`` kind of request (which
    returns its HTTP status) for ``seconds``. Read from the API processes' own counters, so the figure holds apart
    from what else competes for this machine's cores."""
    counts: list[int] = []
    failures: list[int] = []
    until = time.monotonic() + seconds

    def run(client: Client) -> None:
        n = 0
        while time.monotonic() < until:
            status = one(client)
            if status >= 400:
                failures.append(status)
            n += 1
        counts.append(n)

    before = api_cpu_s(api)
    threads = [threading.Thread(target=run, args=(make_client(),)) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    used = api_cpu_s(api) - before
    assert not failures, failures[:5]
    return 1000 * used / max(1, sum(counts)), sum(counts)


RUN_BODY = {
    "strategy": {"name": "dual_sma", "params": {"fast": 5, "slow": 20}},
    "validation": {"permutation": {"n": 10}, "bootstrap": {"n": 50, "block": 10}, "chunk": 10},
}


def finished_view_latency(
    client: Client,
    path: str,
    submit: tuple[str, dict[str, Any]],
    key: str,
    complete: Callable[[dict[str, Any]], bool] = lambda view: True,
) -> float:
    """Seconds of the first ``GET path/<id>`` that sees a job just submitted (``submit``: its POST path and body;
    ``key``: the id's field in the answer) final, polling every 20 ms: what a client pays for a just-finished job's
    view. ``complete``: what that first final view must already show. A job kind's benchmark calls this with its
    own paths and body."""
    status, accepted = client.request("POST", *submit)
    assert status == 202, accepted
    while True:
        time.sleep(0.02)
        began = time.perf_counter()
        status, view = client.request("GET", f"{path}/{accepted[key]}")
        took = time.perf_counter() - began
        assert status == 200, view
        if view["status"] in FINAL:
            assert view["status"] == "succeeded", view["status"]
            assert complete(view), view
            return took


def finished_run_view_latencies(port: int, token: str, symbols: list[str], samples: int) -> list[float]:
    """:func:`finished_view_latency` of ``samples`` backtest runs of ``symbols`` with validation (a new run each
    time: the seed is part of what a run is)."""
    client = Client(port, token)
    body = {**RUN_BODY, "symbols": symbols}
    return [finished_view_latency(client, "/api/runs", ("/api/runs", {**body, "seed": n}), "run_id")
            for n in range(samples)]  # fmt: skip


def trivial_job_latency(port: int, token: str, symbol: str) -> float:
    client = Client(port, token)
    began = time.perf_counter()
    status, body = client.request("POST", "/api/custom-calculations/execute",
                                  {"script": SCRIPT, "column_name": "c", "stock_symbols": [symbol]})  # fmt: skip
    assert status == 202, body
    while True:
        status, job = client.request("GET", f"/api/jobs/{body['job_id']}")
        if job["status"] in FINAL:
            assert job["status"] == "succeeded", job
            return time.perf_counter() - began
        time.sleep(0.002)


def has_outcome(view: dict[str, Any]) -> bool:
    return view["combos_passing"] is not None


def finished_optimization_view_latencies(port: int, token: str, symbol: str, samples: int) -> list[float]:
    """:func:`finished_view_latency` of ``samples`` small dual-SMA optimisations of ``symbol`` (a distinct spec each):
    the first final view must carry the outcome."""
    client = Client(port, token)
    latencies = []
    for i in range(samples):
        doc = {"symbol": symbol, "strategy": "dual_sma", "objective": {"metric": "sharpe", "direction": "max"},
               "parameters": {"fast": [3, 5, 8], "slow": [40 + i, 30]}}  # fmt: skip
        submission = ("/api/optimizations", doc)
        took = finished_view_latency(client, "/api/optimizations", submission, "optimization_id", complete=has_outcome)
        latencies.append(took)
    return latencies


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--users", type=int, default=20)
    parser.add_argument("--latency-samples", type=int, default=20)
    parser.add_argument("--run-samples", type=int, default=20)
    parser.add_argument("--optimization-samples", type=int, default=40)
    args = parser.parse_args()

    with bench_stack("load") as stack:
        database_url, redis_url, work = stack.database_url, stack.redis_url, stack.work
        engine = make_engine(database_url, pool_size=1)
        load_demo_universe(engine, symbols=50, years=1, seed=3)
        with engine.connect() as conn:
            symbols = list(conn.scalars(text("SELECT symbol FROM symbols ORDER BY symbol")))
        with session_scope(make_session_factory(engine)) as session:
            for n in range(args.users):
                users.create_user(session, f"load{n:03d}", PASSWORD)

        port = free_tcp_port()
        settings = Settings.from_env().with_overrides(
            database_url=database_url, redis_url=redis_url, data_dir=work, api_port=port, log_level="WARNING"
        )
        env = {**os.environ, **settings.child_env(), "JWT_SECRET_KEY": secrets.token_urlsafe(48),
               "ALPHAFORGE_RATE_LIMIT_SUBMIT": "1000000/minute", "ALPHAFORGE_RATE_LIMIT_LOGIN": "1000/minute",
               "ALPHAFORGE_MAX_ACTIVE_JOBS": "100000"}  # fmt: skip
        commands = dict(child_commands(settings))
        api = psutil.Process(stack.spawn(commands["api"], env).pid)
        stack.spawn(commands["worker"], env)
        deadline = time.monotonic() + 90
        while True:
            try:
                status, health = Client(port, "none").request("GET", "/api/health")
                if status == 200 and health["workers"]["ok"]:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the API or the worker did not come up"
            time.sleep(0.3)
        tokens = []
        for n in range(args.users):
            status, body = Client(port, "none").request("POST", "/api/auth/login",
                                                        {"username": f"load{n:03d}", "password": PASSWORD})  # fmt: skip
            assert status == 200, body
            tokens.append(body["access_token"])
        trivial_job_latency(port, tokens[0], symbols[0])  # warm-up

        tally = Tally()
        until = time.monotonic() + args.duration
        threads = [
            threading.Thread(
                target=load_client, args=(port, tokens[i % len(tokens)], symbols[i % len(symbols)], until, tally)
            )
            for i in range(args.clients)
        ]
        began = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - began
        requests = len(tally.submit) + len(tally.poll)
        print(f"load: {args.clients} concurrent clients ({args.users} users) for {elapsed:.1f} s, gunicorn "
              f"{' '.join(commands['api'][3:-1])}, worker concurrency {settings.worker_concurrency}, "
              f"cpus {os.cpu_count()}")  # fmt: skip
        print(f"  requests {requests:,} ({requests / elapsed:,.0f}/s), errors {len(tally.errors)}"
              + (f" (first: {tally.errors[:3]})" if tally.errors else ""))  # fmt: skip
        print(f"  submit latency p50 {1000 * pct(tally.submit, 50):.1f} ms, p99 {1000 * pct(tally.submit, 99):.1f} ms"
              f" ({len(tally.submit):,} submissions)")  # fmt: skip
        print(f"  poll latency   p50 {1000 * pct(tally.poll, 50):.1f} ms, p99 {1000 * pct(tally.poll, 99):.1f} ms "
              f"({len(tally.poll):,} polls)")  # fmt: skip
        print(f"  jobs finished {tally.jobs:,}: {tally.jobs / elapsed:.1f} jobs/s")

        time.sleep(2)  # let the queue drain

        # The API's CPU per request, one kind at a time (a poll of a finished job; a one-symbol submission).
        job_body = {"script": SCRIPT, "column_name": "c", "stock_symbols": [symbols[0]]}
        status, done = Client(port, tokens[0]).request("POST", "/api/custom-calculations/execute", job_body)
        assert status == 202, done
        job_path = f"/api/jobs/{done['job_id']}"

        def poll(client: Client) -> int:
            return client.request("GET", job_path)[0]

        def submit(client: Client) -> int:
            return client.request("POST", "/api/custom-calculations/execute", job_body)[0]

        poll_ms, polls = cpu_per_request(api, lambda: Client(port, tokens[0]), 16, 5.0, poll)
        submit_ms, submits = cpu_per_request(api, lambda: Client(port, tokens[1 % len(tokens)]), 16, 5.0, submit)
        print(f"API CPU per request (its processes' own counters): poll {poll_ms:.2f} ms ({polls:,} polls), "
              f"submit {submit_ms:.2f} ms ({submits:,} submissions); one core serves about {1000 / poll_ms:,.0f} "
              f"polls/s or {1000 / submit_ms:,.0f} submissions/s")  # fmt: skip
        views = finished_run_view_latencies(port, tokens[2 % len(tokens)], symbols, args.run_samples)
        print(
            f"GET /api/runs/<id> of a just-finished run ({len(symbols)} symbols, validation; first poll that sees "
            f"it final, {len(views)} runs): p50 {1000 * pct(views, 50):.1f} ms, p99 {1000 * pct(views, 99):.1f} ms"
        )
        time.sleep(2)  # let the queue drain
        latencies = [trivial_job_latency(port, tokens[0], symbols[0]) for _ in range(args.latency_samples)]
        app = create_celery(settings)
        round_trips = []
        for _ in range(args.latency_samples):
            t0 = time.perf_counter()
            app.send_task("celery.accumulate", args=(1,), ignore_result=False).get(timeout=10)
            round_trips.append(time.perf_counter() - t0)
        app.close()
        with engine.connect() as conn:
            bars = load_bars(conn, [symbols[0]], None, None)
        starts = []
        for _ in range(args.latency_samples):
            t0 = time.perf_counter()
            run_script(SCRIPT, {}, list(bars.values()), settings.sandbox)
            starts.append(time.perf_counter() - t0)
        floor = statistics.median(round_trips) + statistics.median(starts)
        trivial = statistics.median(latencies)
        print(f"trivial one-symbol job, submit -> finished seen by a client polling every 2 ms (median of "
              f"{len(latencies)}): {1000 * trivial:.1f} ms (min {1000 * min(latencies):.1f}, "
              f"max {1000 * max(latencies):.1f})")  # fmt: skip
        print(f"floor: bare Celery round trip {1000 * statistics.median(round_trips):.1f} ms + sandbox process "
              f"start (one symbol) {1000 * statistics.median(starts):.1f} ms = {1000 * floor:.1f} ms; "
              f"ratio {trivial / floor:.2f} (goal <= 2.00)")  # fmt: skip
        views = finished_optimization_view_latencies(port, tokens[0], symbols[0], args.optimization_samples)
        print(
            f"GET /api/optimizations/<id> of a just-finished optimisation (one symbol, 6 combos; first poll that "
            f"sees it final, {len(views)} optimisations): p50 {1000 * pct(views, 50):.1f} ms, "
            f"p99 {1000 * pct(views, 99):.1f} ms"
        )
        engine.dispose()
        return 0


if __name__ == "__main__":
    sys.exit(main())
