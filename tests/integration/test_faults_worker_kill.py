"""Faults survived, with real processes: a Celery worker killed with SIGKILL in the middle of a 40-shard job.

Its own broker (a separate Redis database) and its own processes: worker A, Celery beat running the reconciler
every second, and later worker B. A is killed mid-job (its pool and sandbox processes die with it: PDEATHSIG);
the shards it held stay in Redis' ``unacked`` set until the visibility timeout (an hour), so only the reconciler
can bring them back. The job must finish with every symbol stored exactly once.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import psutil
import pytest
import redis
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session, sessionmaker

from shared.contract import create_celery, shard_enqueuer
from shared.infra.config import Maintenance, Settings
from shared.infra.models import Job, JobResult, JobShard
from shared.jobs import calculations
from shared.jobs.calculations import CalculationRequest
from tests.helpers import FINAL, seed_bars

pytestmark = pytest.mark.slow  # scheduled first (tests/conftest.py)

PROJECT_ROOT = Path(__file__).resolve().parents[2]
FAULT_REDIS_DB = 13
SYMBOLS = 200
SHARD_SIZE = 5  # 40 shards
SCRIPT = "s = 0\nfor i in range(150000):\n    s += i\nresult = close[-1]"


@pytest.fixture
def fault_settings(settings: Settings) -> Iterator[Settings]:
    """The test database, a Redis database of its own (no other worker consumes it), fast reconciler."""
    base, _, _db = settings.require_redis_url().rpartition("/")
    fault = settings.with_overrides(
        redis_url=f"{base}/{FAULT_REDIS_DB}",
        shard_size=SHARD_SIZE,
        maintenance=replace(Maintenance(), reconcile_interval_s=1.0, reconcile_grace_s=3.0, reconcile_max_requeues=3),
    )
    client = redis.Redis.from_url(fault.require_redis_url())
    client.flushdb()
    yield fault
    client.flushdb()
    client.close()


class Processes:
    """Celery processes started by a test, each in its own process group, all killed at the end."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        env = {**os.environ, **self.settings.child_env(), "PYTHONUNBUFFERED": "1"}
        log_path = self.settings.data_dir / f"fault-{name}.log"
        with open(log_path, "wb") as log_file:
            proc = subprocess.Popen([sys.executable, "-m", "worker", *args], cwd=PROJECT_ROOT, env=env,
                                    stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        self.procs.append(proc)
        return proc

    def log(self, name: str) -> str:
        return (self.settings.data_dir / f"fault-{name}.log").read_text(errors="replace")

    def stop_all(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@pytest.fixture
def processes(fault_settings: Settings) -> Iterator[Processes]:
    procs = Processes(fault_settings)
    yield procs
    procs.stop_all()


def wait_for(predicate: object, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(0.05)


def kill_mid_work(
    worker: subprocess.Popen[bytes], ready: Callable[[], bool], holds: Callable[[], bool], timeout_s: float = 60
) -> float:
    """SIGKILL a worker's main process while it holds work; the monotonic time of the kill, once its pool is gone.

    Waits for ``ready``, then freezes the worker's whole process group before asking ``holds``, so that nothing it
    runs can finish between the look and the kill; if it holds nothing at that instant, it goes on and is looked at
    again. Its frozen pool follows the main process (PDEATHSIG: SIGKILL, which a stopped process takes too); a
    sandbox process caught between fork and its own setsid was frozen with the group, and is let go on to find its
    parent gone and exit."""
    deadline = time.monotonic() + timeout_s
    while True:
        wait_for(ready, timeout_s, "the worker to be in the middle of the job")
        os.killpg(worker.pid, signal.SIGSTOP)
        if holds():
            break
        os.killpg(worker.pid, signal.SIGCONT)
        assert time.monotonic() < deadline, "the worker never held work when frozen"
    os.kill(worker.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    worker.wait(timeout=10)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(worker.pid, signal.SIGCONT)
    wait_for(lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in _group(worker.pid)),
             10, "the worker's pool to die")  # fmt: skip
    return killed_at


def shard_statuses(factory: sessionmaker[Session], job_id: object) -> list[str]:
    with factory() as session:
        return list(session.scalars(select(JobShard.status).where(JobShard.job_id == job_id)))


def test_job_survives_sigkill_of_its_worker(
    clean_db: Engine, session_factory: sessionmaker[Session], fault_settings: Settings, processes: Processes
) -> None:
    symbols = [f"F{i:03d}" for i in range(SYMBOLS)]
    seed_bars(clean_db, symbols, days=30)
    app = create_celery(fault_settings)
    try:
        worker_a = processes.start("worker-a", "worker", "--hostname", "fault-a@%h", "--concurrency", "2")
        processes.start("beat", "beat", "--schedule", str(fault_settings.data_dir / "fault-beat-schedule"))
        wait_for(lambda: app.control.ping(timeout=0.5), 60, "worker A")

        request = CalculationRequest(script=SCRIPT, column_name="c", symbols=symbols)
        job = calculations.submit_calculation(session_factory, request, shard_size=SHARD_SIZE,
                                              enqueue=shard_enqueuer(app))  # fmt: skip
        assert job.shards_total == 40

        def a_is_mid_job() -> bool:
            statuses = shard_statuses(session_factory, job.id)
            return statuses.count("succeeded") >= 4 and statuses.count("running") >= 1

        killed_at = kill_mid_work(worker_a, a_is_mid_job, lambda: "running" in shard_statuses(session_factory, job.id))
        statuses = shard_statuses(session_factory, job.id)
        stranded = statuses.count("running")
        assert stranded >= 1 and statuses.count("succeeded") < 40

        processes.start("worker-b", "worker", "--hostname", "fault-b@%h", "--concurrency", "2")

        def finished() -> bool:
            with session_factory() as session:
                status = session.scalar(select(Job.status).where(Job.id == job.id))
            return status in FINAL

        wait_for(finished, 120, "the job to finish after the kill")
        recovered_s = time.monotonic() - killed_at
    finally:
        app.close()

    with session_factory() as session:
        final = session.get(Job, job.id)
        assert final is not None
        stored = session.execute(
            select(JobResult.symbol, func.count()).where(JobResult.job_id == job.id).group_by(JobResult.symbol)
        ).all()
        requeued = session.scalars(select(JobShard.requeues).where(JobShard.job_id == job.id)).all()
        errors = session.scalars(select(JobResult.error).where(JobResult.job_id == job.id)).all()
    assert final.status == "succeeded", final.error
    assert (final.shards_done, final.symbols_done, final.symbols_failed) == (40, SYMBOLS, 0)  # each counted once
    assert sorted(symbol for symbol, _ in stored) == symbols and {n for _, n in stored} == {1}
    assert set(errors) == {None}
    assert sum(1 for n in requeued if n >= 1) >= stranded  # the stranded shards came back through the reconciler
    assert "re-enqueued" in processes.log("worker-b")
    print(f"\n[fault] SIGKILL of worker A with {stranded} shards running: job finished {recovered_s:.1f} s later, "
          f"{sum(requeued)} re-enqueues")  # fmt: skip


def _group(pgid: int) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if os.getpgid(proc.pid) == pgid:
                found.append(proc)
    return found
