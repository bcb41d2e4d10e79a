"""Two Celery beat processes on one broker (celery-redbeat): only the one holding the lock fires."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import redis

from shared.infra.config import Maintenance, Settings
from tests.helpers import wait_until

PROJECT_ROOT = Path(__file__).resolve().parents[2]
BEAT_REDIS_DB = 12


LOCK_KEY = "alphaforge:redbeat::lock"  # what the compose health check of beat looks at
TICK = "Sending due task reconcile-shards"
STARTUP_TIMEOUT_S = 90  # a beat process starting on a loaded machine (imports, Redis schedule set-up)
TICKS_TIMEOUT_S = 60  # for a handful of 1-second ticks, on a loaded machine


def _start_beat(env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    with open(log_path, "wb") as log_file:
        return subprocess.Popen([sys.executable, "-m", "worker", "beat", "--loglevel=INFO"], cwd=PROJECT_ROOT,
                                env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """TERM, then KILL if it has not stopped within 20 s: a beat still waiting for the lock may not see the TERM
    at once, and a test must never leave a beat behind to fire into later tests."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_a_second_beat_process_does_not_fire(settings: Settings) -> None:
    base, _, _db = settings.require_redis_url().rpartition("/")
    beat_settings = settings.with_overrides(
        redis_url=f"{base}/{BEAT_REDIS_DB}",  # no worker consumes this database: the ticks just pile up there
        maintenance=replace(Maintenance(), reconcile_interval_s=1.0, nightly_schedule="off"),
    )
    client = redis.Redis.from_url(beat_settings.require_redis_url())
    client.flushdb()
    env = {**os.environ, **beat_settings.child_env(), "PYTHONUNBUFFERED": "1"}
    holder_log, standby_log = (beat_settings.data_dir / f"beat-lock-{n}.log" for n in (1, 2))
    procs: list[subprocess.Popen[bytes]] = []

    def log(path: Path) -> str:
        return path.read_text(errors="replace")

    def alive() -> bool:
        return all(p.poll() is None for p in procs)

    def until(predicate: Callable[[], object], timeout_s: float, what: str) -> None:
        def check() -> object:
            assert alive(), [log(path)[-2000:] for path in (holder_log, standby_log) if path.exists()]
            return predicate()

        wait_until(check, timeout_s, what, poll_s=0.1)

    try:
        procs.append(_start_beat(env, holder_log))
        until(lambda: "beat: Acquired lock" in log(holder_log) and client.exists(LOCK_KEY), STARTUP_TIMEOUT_S,
              "the first beat takes the lock")  # fmt: skip
        token = client.get(LOCK_KEY)
        procs.append(_start_beat(env, standby_log))
        # "Starting..." comes right before the startup hook that blocks on the lock.
        until(lambda: "beat: Starting..." in log(standby_log), STARTUP_TIMEOUT_S, "the second beat starts")
        ticks_then = log(holder_log).count(TICK)
        until(lambda: log(holder_log).count(TICK) >= ticks_then + 4, TICKS_TIMEOUT_S,
              "the holder fires four more ticks while the second beat waits")  # fmt: skip
        assert client.get(LOCK_KEY) == token  # held by the first beat all along
        standby_text = log(standby_log)
        assert TICK not in standby_text and "Acquired lock" not in standby_text, standby_text[-2000:]
        assert client.llen("maintenance") >= 4

        # Handover: the holder's stop frees the lock; the waiting beat takes it and fires from then on.
        _stop(procs[0])
        wait_until(lambda: TICK in log(standby_log), TICKS_TIMEOUT_S,
                   f"the second beat takes over and fires; its log:\n{log(standby_log)[-2000:]}")  # fmt: skip
        assert procs[1].poll() is None
        assert "beat: Acquired lock" in log(standby_log)
        assert client.get(LOCK_KEY) not in (None, token)
    finally:
        for proc in reversed(procs):
            _stop(proc)
        client.flushdb()
        client.close()
