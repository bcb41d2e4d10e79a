"""Two Celery beat processes on one broker (celery-redbeat): only the one holding the lock fires."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import redis

from shared.infra.config import Maintenance, Settings

PROJECT_ROOT = Path(__file__).resolve().parents[2]
BEAT_REDIS_DB = 12


def test_a_second_beat_process_does_not_fire(settings: Settings) -> None:
    base, _, _db = settings.require_redis_url().rpartition("/")
    beat_settings = settings.with_overrides(
        redis_url=f"{base}/{BEAT_REDIS_DB}",  # no worker consumes this database: the ticks just pile up there
        maintenance=replace(Maintenance(), reconcile_interval_s=1.0, nightly_schedule="off"),
    )
    client = redis.Redis.from_url(beat_settings.require_redis_url())
    client.flushdb()
    env = {**os.environ, **beat_settings.child_env(), "PYTHONUNBUFFERED": "1"}
    procs: list[subprocess.Popen[bytes]] = []
    logs = [beat_settings.data_dir / f"beat-lock-{n}.log" for n in (1, 2)]
    try:
        for log_path in logs:
            with open(log_path, "wb") as log_file:
                procs.append(subprocess.Popen([sys.executable, "-m", "worker", "beat", "--loglevel=INFO"],
                                              cwd=PROJECT_ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                              start_new_session=True))  # fmt: skip
            time.sleep(1.5)  # the first one takes the lock
        time.sleep(6)
        assert all(p.poll() is None for p in procs), [log.read_text()[-2000:] for log in logs]
        assert client.exists("alphaforge:redbeat::lock")  # what the compose health check of beat looks at
    finally:
        # The standby first: stopped the other way round, the holder's exit frees the lock and the standby,
        # still running, takes it and fires once before its own stop.
        for proc in reversed(procs):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        queued = client.llen("maintenance")
        client.flushdb()
        client.close()
    sent = [log.read_text(errors="replace").count("Sending due task reconcile-shards") for log in logs]
    assert sent[0] >= 4 and sent[1] == 0, sent
    assert queued >= 4
