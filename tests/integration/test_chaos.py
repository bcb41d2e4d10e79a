"""Chaos, bounded and seeded: a mixed workload (calculations, a backtest run with validation, an optimisation)
submitted through the API while a schedule of faults hits the system: SIGKILL of a worker's main process (the test
starts it again, as ``up``'s supervisor does), SIGKILL of a pool process, a restart of Redis (same port, append-only
file) and a pause of PostgreSQL (SIGSTOP of every server process, then SIGCONT).

Every submission that got a 2xx must reach a final status, with each symbol's result stored exactly once and equal
to the same workload run undisturbed beforehand by another user on the same stack. After each fault a one-symbol
probe job is submitted (retried while the API answers 503): the time from the end of the fault to the probe's final
status is that fault's recovery time, printed.

Its own PostgreSQL, Redis, two workers and beat, so that nothing it does reaches the other tests' servers.
``ALPHAFORGE_CHAOS_SEED`` picks another schedule.
"""

from __future__ import annotations

import contextlib
import os
import random
import secrets
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import psutil
import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import Engine, func, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from api import create_app
from shared.contract import create_celery
from shared.infra import dbadmin, migrate
from shared.infra.config import Maintenance, Settings
from shared.infra.db import make_engine, make_session_factory
from shared.infra.models import Job, JobResult, JobShard
from shared.ops.embedded import EmbeddedPostgres, EmbeddedRedis
from tests.helpers import FINAL, authed_client, make_user, seed_bars
from tests.integration.test_faults_worker_kill import Processes

pytestmark = pytest.mark.slow  # scheduled first (tests/conftest.py)

SEED = int(os.environ.get("ALPHAFORGE_CHAOS_SEED", "1414"))
SHARD_SIZE = 5
CALC_SYMBOLS = [f"CH{i:02d}" for i in range(30)]
RUN_SYMBOLS = CALC_SYMBOLS[:6]
CALC_SCRIPT = "s = 0\nfor i in range(1000000):\n    s += i\nresult = close[-1] / close[0] + {k}"
PROBE_SCRIPT = "result = close[-1]"
PAUSE_S = 3.0  # how long PostgreSQL stays frozen
FINAL_TIMEOUT_S = 240.0

RUN_BODY: dict[str, Any] = {
    "symbols": RUN_SYMBOLS,
    "strategy": {"name": "dual_sma", "params": {"fast": 5, "slow": 20}},
    "execution": {"fee_bps": 5, "slippage_bps": 2},
    "seed": 7,
    "validation": {"permutation": {"n": 10}, "bootstrap": {"n": 40, "block": 10}, "chunk": 4},
}
OPT_BODY: dict[str, Any] = {
    "symbols": RUN_SYMBOLS[:2],
    "strategy": "dual_sma",
    "execution": {"fee_bps": 10},
    "parameters": {"fast": {"start": 3, "stop": 15, "step": 2}, "slow": [10, 20, 30, 40]},
    "objective": {"metric": "sharpe", "direction": "max"},
}


@dataclass
class Item:
    """One submission of the workload: where it goes, and what came back."""

    kind: str  # calculation | run | optimization
    path: str
    body: dict[str, Any]
    id: str | None = None
    status_code: int | None = None


def workload() -> list[Item]:
    calcs = [
        Item("calculation", "/api/custom-calculations/execute",
             {"script": CALC_SCRIPT.format(k=k), "column_name": f"c{k}", "stock_symbols": CALC_SYMBOLS})
        for k in range(3)
    ]  # fmt: skip
    return [*calcs, Item("run", "/api/runs", RUN_BODY), Item("optimization", "/api/optimizations", OPT_BODY)]


@dataclass
class Stack:
    settings: Settings
    postgres: EmbeddedPostgres
    redis: EmbeddedRedis
    engine: Engine
    factory: sessionmaker[Session]
    app: Flask
    processes: Processes
    workers: dict[str, Any] = field(default_factory=dict)

    def start_worker(self, name: str) -> None:
        self.workers[name] = self.processes.start(name, "worker", "--hostname", f"{name}@%h", "--concurrency", "1")


@pytest.fixture
def stack(settings: Settings, test_password_hash: str) -> Iterator[Stack]:
    data_dir = Path(tempfile.mkdtemp(prefix="af-chaos-", dir="/tmp"))
    postgres = EmbeddedPostgres(data_dir / "pg")
    redis_server = EmbeddedRedis(data_dir / "redis")
    processes: Processes | None = None
    engine: Engine | None = None
    app: Flask | None = None
    try:
        database_url = dbadmin.create_database(postgres.start(), f"af_chaos_{secrets.token_hex(4)}")
        migrate.upgrade(database_url)
        chaos = settings.with_overrides(
            database_url=database_url,
            redis_url=redis_server.start(),
            data_dir=data_dir,
            shard_size=SHARD_SIZE,
            maintenance=replace(Maintenance(), nightly_schedule="off"),
        )
        engine = make_engine(database_url, pool_size=2)
        seed_bars(engine, CALC_SYMBOLS, days=300, seed=SEED)
        app = create_app(chaos)
        processes = Processes(chaos)
        result = Stack(chaos, postgres, redis_server, engine, make_session_factory(engine), app, processes)
        result.start_worker("chaos-a")
        result.start_worker("chaos-b")
        processes.start("chaos-beat", "beat", "--schedule", str(data_dir / "chaos-beat-schedule"))
        celery = create_celery(chaos)
        try:
            _wait(lambda: len(celery.control.ping(timeout=0.5) or []) >= 2, 90, "both workers")
        finally:
            celery.close()
        yield result
    finally:
        if processes is not None:
            processes.stop_all()
        if app is not None:
            app.extensions["alphaforge"].engine.dispose()
        if engine is not None:
            engine.dispose()
        redis_server.stop()
        postgres.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


def _wait(predicate: Callable[[], object], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(0.1)


def _submit(client: FlaskClient, item: Item, deadline_s: float = 60.0) -> None:
    """POST until the API accepts it: a 503 (a server is down) or 429 is what a client retries."""
    deadline = time.monotonic() + deadline_s
    while True:
        response = client.post(item.path, json=item.body)
        if response.status_code < 300:
            body = response.get_json()
            item.id = body.get("job_id") or body.get("run_id") or body.get("optimization_id")
            item.status_code = response.status_code
            return
        assert response.status_code in (429, 503), (response.status_code, response.get_data(as_text=True)[:500])
        assert time.monotonic() < deadline, f"{item.kind} not accepted within {deadline_s} s"
        time.sleep(0.2)


def _get(client: FlaskClient, path: str) -> dict[str, Any] | None:
    """A GET's JSON, or None while the API answers 503 (PostgreSQL paused, Redis restarting)."""
    response = client.get(path)
    if response.status_code == 503:
        return None
    assert response.status_code == 200, (path, response.status_code, response.get_data(as_text=True)[:500])
    body: dict[str, Any] = response.get_json()
    return body


def _wait_final(client: FlaskClient, job_id: str, timeout_s: float = FINAL_TIMEOUT_S) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        view = _get(client, f"/api/jobs/{job_id}")
        if view is not None and view["status"] in FINAL:
            return view
        assert time.monotonic() < deadline, f"job {job_id} not final after {timeout_s} s: {view}"
        time.sleep(0.05)


def _outcome(client: FlaskClient, item: Item) -> Any:
    """What must equal the undisturbed run: per-symbol values, a run's metrics and validation, an optimisation's
    ranked table."""
    assert item.id is not None
    if item.kind == "calculation":
        rows: list[Any] = []
        cursor = None
        while True:
            page = _get(client, f"/api/jobs/{item.id}/results?limit=1000" + (f"&cursor={cursor}" if cursor else ""))
            assert page is not None
            rows += [(r["symbol"], r["value"], r["error"]) for r in page["results"]]
            cursor = page["next_cursor"]
            if not cursor:
                return rows
    if item.kind == "run":
        page = _get(client, f"/api/runs/{item.id}/results?limit=100")
        view = _wait_for(lambda: _view_with(client, f"/api/runs/{item.id}", "validation"), "run validation")
        assert page is not None
        return [(r["symbol"], r["metrics"], r["error"]) for r in page["results"]], view["validation"]["result"]
    view = _wait_for(lambda: _view_with(client, f"/api/optimizations/{item.id}", "best"), "optimisation outcome")
    page = _get(client, f"/api/optimizations/{item.id}/results?limit=1000")
    assert page is not None
    return page["results"], view["best"]


def _view_with(client: FlaskClient, path: str, key: str) -> dict[str, Any] | None:
    view = _get(client, path)
    if view is None or not view.get(key) or (key == "validation" and not view[key].get("result")):
        return None
    return view


def _wait_for(fetch: Callable[[], dict[str, Any] | None], what: str, timeout_s: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while (found := fetch()) is None:
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return found


# --- faults --------------------------------------------------------------------------------------------------


def _postgres_processes(server: EmbeddedPostgres) -> list[psutil.Process]:
    postmaster = int((server.data_dir / "postmaster.pid").read_text().split()[0])
    root = psutil.Process(postmaster)
    return [root, *root.children(recursive=True)]


@dataclass(frozen=True)
class Hit:
    """What a fault struck: its description and the shards that were running when it did (id -> attempts)."""

    what: str
    shards: dict[int, int]


def _running(factory: sessionmaker[Session]) -> list[tuple[int, int, str]]:
    """Running shards with a lease: (shard id, attempts, holder "<node> pid <pool pid>")."""
    with factory() as session:
        rows = session.execute(
            select(JobShard.id, JobShard.attempts, JobShard.lease_holder).where(
                JobShard.status == "running", JobShard.lease_holder.is_not(None)
            )
        ).all()
    return [(shard_id, attempts, str(holder)) for shard_id, attempts, holder in rows]


def _victim(stack: Stack, rng: random.Random) -> tuple[str, int, dict[int, int]]:
    """A pool process running a shard now, from the shards' leases: (worker name, pool pid, its shards)."""
    _wait(lambda: _running(stack.factory), 60, "a shard running for the fault to hit")
    running = _running(stack.factory)
    holder = rng.choice(sorted({h for _, _, h in running}))
    node, _, pid = holder.rpartition(" pid ")
    name = node.partition("@")[0]
    assert name in stack.workers, holder
    return name, int(pid), {shard_id: attempts for shard_id, attempts, h in running if h == holder}


def kill_worker_main(stack: Stack, rng: random.Random) -> Hit:
    name, _, shards = _victim(stack, rng)
    proc = stack.workers[name]
    os.kill(proc.pid, signal.SIGKILL)  # its pool and sandbox processes follow (PDEATHSIG)
    proc.wait(timeout=10)
    stack.start_worker(name)  # what `up`'s supervisor does
    return Hit(f"SIGKILL of {name}'s main process (pid {proc.pid}), started again", shards)


def kill_pool_process(stack: Stack, rng: random.Random) -> Hit:
    name, pid, shards = _victim(stack, rng)
    os.kill(pid, signal.SIGKILL)  # Celery replaces the process; the task comes back (reject_on_worker_lost)
    return Hit(f"SIGKILL of {name}'s pool process (pid {pid})", shards)


def restart_redis(stack: Stack, rng: random.Random) -> Hit:
    shards = {shard_id: attempts for shard_id, attempts, _ in _running(stack.factory)}
    stack.redis.stop()  # SIGTERM: the append-only file is flushed
    stack.redis.start()  # the same port and data dir
    return Hit(f"Redis restarted on port {stack.redis.port}", shards)


def pause_postgres(stack: Stack, rng: random.Random) -> Hit:
    shards = {shard_id: attempts for shard_id, attempts, _ in _running(stack.factory)}
    procs = _postgres_processes(stack.postgres)
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.suspend()
    try:
        time.sleep(PAUSE_S)  # the fault's duration, not a wait for a condition
    finally:
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.resume()
    return Hit(f"PostgreSQL paused for {PAUSE_S:.0f} s ({len(procs)} processes)", shards)


FAULTS: list[Callable[[Stack, random.Random], Hit]] = [kill_worker_main, kill_pool_process, restart_redis,
                                                       pause_postgres]  # fmt: skip


def _wait_in_flight_moved(factory: sessionmaker[Session], before: dict[int, int]) -> None:
    """Until every shard that was running when the fault struck has finished or runs again (a new attempt): the
    work in flight is moving again."""

    def moved() -> bool:
        with contextlib.suppress(OperationalError):  # PostgreSQL may still be waking up
            with factory() as session:
                rows = session.execute(
                    select(JobShard.id, JobShard.status, JobShard.attempts).where(JobShard.id.in_(list(before)))
                ).all()
            return all(status != "running" or attempts > before[shard_id] for shard_id, status, attempts in rows)
        return False

    _wait(moved, FINAL_TIMEOUT_S, "the shards in flight at the fault to move again")


def _probe(client: FlaskClient, symbol: str) -> float:
    """Seconds until a one-symbol job submitted now is final (service restored end to end)."""
    started = time.monotonic()
    item = Item("calculation", "/api/custom-calculations/execute",
                {"script": PROBE_SCRIPT, "column_name": "probe", "stock_symbols": [symbol]})  # fmt: skip
    _submit(client, item)
    assert item.id is not None
    view = _wait_final(client, item.id, timeout_s=90)
    assert view["status"] == "succeeded", view
    return time.monotonic() - started


# --- the test ------------------------------------------------------------------------------------------------


def _stored_once(factory: sessionmaker[Session], job_id: str, expected: int) -> None:
    with factory() as session:
        job = session.get(Job, job_id)
        per_symbol = session.execute(
            select(JobResult.symbol, func.count()).where(JobResult.job_id == job_id).group_by(JobResult.symbol)
        ).all()
    assert job is not None
    assert job.shards_done == job.shards_total, (job.shards_done, job.shards_total)
    assert job.symbols_done == job.symbols_total == expected == len(per_symbol), (job.symbols_done, expected)
    assert {n for _, n in per_symbol} == {1}


def test_mixed_workload_survives_a_seeded_schedule_of_faults(stack: Stack, test_password_hash: str) -> None:
    rng = random.Random(SEED)
    reference_client = authed_client(stack.app, make_user(stack.app, stack.engine, "ref", test_password_hash))
    chaos_user = make_user(stack.app, stack.engine, "chaos", test_password_hash)
    chaos_client = authed_client(stack.app, chaos_user)
    # Probes come from a user of their own: the fairness rule puts a busy user's new shards behind its others.
    probe_client = authed_client(stack.app, make_user(stack.app, stack.engine, "probe", test_password_hash))

    reference = workload()
    reference_started = time.monotonic()
    for item in reference:
        _submit(reference_client, item)
    for item in reference:
        assert item.id is not None
        assert _wait_final(reference_client, item.id)["status"] == "succeeded", item
    expected = {i: _outcome(reference_client, item) for i, item in enumerate(reference)}
    reference_s = time.monotonic() - reference_started

    chaos = workload()
    rng.shuffle(chaos)
    schedule = list(FAULTS)
    rng.shuffle(schedule)
    chaos_started = time.monotonic()
    recoveries: list[tuple[str, float, float]] = []
    for n, fault in enumerate(schedule):
        _submit(chaos_client, chaos[n])  # one more part of the workload before each fault: work is in flight
        _wait(lambda: _running(stack.factory), 60, "a shard running for the fault to hit")
        time.sleep(rng.uniform(0.0, 0.3))  # the schedule's jitter (pacing, not a wait for a condition)
        struck = time.monotonic()
        hit = fault(stack, rng)
        print(f"[chaos] {struck - chaos_started:.1f} s: {hit.what}, hitting shards {sorted(hit.shards)}", flush=True)
        _wait_in_flight_moved(stack.factory, hit.shards)
        moved_s = time.monotonic() - struck
        probe_s = _probe(probe_client, rng.choice(CALC_SYMBOLS))
        recoveries.append((f"{hit.what} ({len(hit.shards)} shards hit)", moved_s, probe_s))
    for item in chaos[len(schedule) :]:
        _submit(chaos_client, item)

    for item in chaos:
        assert item.status_code is not None and item.status_code < 300 and item.id is not None, item
        view = _wait_final(chaos_client, item.id)
        assert view["status"] == "succeeded", (item.kind, view)
        if item.kind != "optimization":  # an optimisation's slices are task shards, with no symbol rows
            _stored_once(stack.factory, item.id, len(item.body.get("stock_symbols") or item.body["symbols"]))
    final_s = time.monotonic() - chaos_started
    for item in chaos:
        twin = next(i for i, ref in enumerate(reference) if ref.body == item.body and ref.kind == item.kind)
        assert _outcome(chaos_client, item) == expected[twin], f"{item.kind} differs from the undisturbed run"
    print(f"\n[chaos] seed {SEED}, the workload undisturbed {reference_s:.1f} s, under faults {final_s:.1f} s")
    for what, moved_s, probe_s in recoveries:
        print(
            f"[chaos] {what}: the work in flight moved again {moved_s:.1f} s after the fault struck; a new "
            f"one-symbol job took {probe_s:.1f} s after that"
        )
