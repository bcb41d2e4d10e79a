"""Histograms kept in Redis, so that every API process and every worker on every host adds to the same series
and ``GET /metrics`` (any API process) reads them whole.

A Prometheus client keeps its counters in the process that observes; with gunicorn's processes and Celery's pool
processes on several hosts a scrape would see one process's share. Here an observation is one pipelined round
trip (``HINCRBY`` of its bucket, count and sum); the reader makes the buckets cumulative.
"""

from __future__ import annotations

import json
import logging
from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass

import redis

log = logging.getLogger(__name__)

API_LATENCY = "api_request_seconds"
API_BUCKETS: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
SHARD_LATENCY = "shard_seconds"
SHARD_BUCKETS: tuple[float, ...] = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0)
INF = "+Inf"


def _key(name: str) -> str:
    return f"alphaforge:metrics:{name}"


def observe(client: redis.Redis, name: str, labels: dict[str, str], seconds: float, buckets: Sequence[float]) -> None:
    """Add one observation. Never raises: a metrics outage must not fail a request or a shard."""
    index = bisect_left(buckets, seconds)
    le = str(buckets[index]) if index < len(buckets) else INF
    series = json.dumps(labels, sort_keys=True, separators=(",", ":"))
    try:
        pipe = client.pipeline(transaction=False)
        pipe.hincrby(_key(name), f"{series}|{le}", 1)
        pipe.hincrby(_key(name), f"{series}|count", 1)
        pipe.hincrbyfloat(_key(name), f"{series}|sum", seconds)
        pipe.execute()
    except redis.RedisError:
        log.debug("metrics: observation of %s lost (Redis unavailable)", name, exc_info=True)


@dataclass
class Series:
    labels: dict[str, str]
    buckets: list[tuple[str, float]]  # cumulative (le, count), ending with +Inf
    count: float
    total: float


def read(client: redis.Redis, name: str, buckets: Sequence[float]) -> list[Series]:
    raw: dict[bytes, bytes] = client.hgetall(_key(name))  # type: ignore[assignment]
    per_series: dict[str, dict[str, float]] = {}
    for field, value in raw.items():
        series, _, part = field.decode().rpartition("|")
        per_series.setdefault(series, {})[part] = float(value)
    out = []
    for series, parts in sorted(per_series.items()):
        running = 0.0
        cumulative = []
        for le in [*(str(b) for b in buckets), INF]:
            running += parts.get(le, 0.0)
            cumulative.append((le, running))
        out.append(Series(json.loads(series), cumulative, parts.get("count", 0.0), parts.get("sum", 0.0)))
    return out
