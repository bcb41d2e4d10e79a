"""Shard wall time into the shared Redis histogram (shared/infra/metrics_store.py), from Celery's task signals: the
task code stays as it is, and every pool process on every host adds to the same series."""

from __future__ import annotations

import time
from typing import Any

import redis
from celery import signals

from shared.infra import metrics_store

_STARTED = "_alphaforge_metrics_started"
_CLIENT = "_alphaforge_metrics_redis"


def _is_shard_task(task: Any, shard_tasks: dict[str, str]) -> str | None:
    name = getattr(task, "name", None)
    return next((kind for kind, task_name in shard_tasks.items() if task_name == name), None)


def connect(shard_tasks: dict[str, str]) -> None:
    """Observe the tasks named in ``shard_tasks`` (job kind -> task name)."""

    def started(task: Any = None, **_: Any) -> None:
        if task is not None and _is_shard_task(task, shard_tasks):
            setattr(task.request, _STARTED, time.perf_counter())

    def finished(task: Any = None, **_: Any) -> None:
        kind = _is_shard_task(task, shard_tasks) if task is not None else None
        began = getattr(task.request, _STARTED, None) if kind else None
        if kind is None or began is None:
            return
        client = getattr(task, _CLIENT, None)
        if client is None:  # one client per pool process (and task), made after the fork
            client = redis.Redis.from_url(task.app.conf.alphaforge_settings.require_redis_url(), socket_timeout=2)
            setattr(task, _CLIENT, client)
        seconds = time.perf_counter() - began
        metrics_store.observe(client, metrics_store.SHARD_LATENCY, {"kind": kind}, seconds, metrics_store.SHARD_BUCKETS)

    signals.task_prerun.connect(started, weak=False, dispatch_uid="alphaforge-shard-metrics-start")
    signals.task_postrun.connect(finished, weak=False, dispatch_uid="alphaforge-shard-metrics-end")
