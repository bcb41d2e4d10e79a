"""``GET /metrics`` (Prometheus text format); readiness is in api/health.py.

Metrics are read at scrape time from where the truth is: job counts and sandbox rejections from PostgreSQL, queue
depths from the broker, latency histograms from Redis (shared/infra/metrics_store.py: every API and worker process adds
to the same series). ``/metrics`` needs ``Authorization: Bearer <ALPHAFORGE_METRICS_TOKEN>`` when that is set.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Iterator
from typing import Any

import redis
from flask import Flask, Response, g, request
from flask_openapi3 import APIBlueprint, Tag
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import text

from api import services
from api.health import PRIORITY_SEP, QUEUE_NAMES
from shared.errors import Unauthorized
from shared.infra import metrics_store

log = logging.getLogger(__name__)

bp = APIBlueprint("ops_metrics", __name__, abp_tags=[Tag(name="operations")])

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _Collector(Collector):
    def collect(self) -> Iterator[Metric]:
        svc = services()
        with svc.engine.connect() as conn:
            jobs = conn.execute(text("SELECT kind, status, count(*) FROM jobs GROUP BY kind, status")).all()
            shards = conn.execute(text("SELECT status, count(*) FROM job_shards GROUP BY status")).all()
            rejections = conn.execute(
                text("SELECT layer, reason, count(*) FROM security_events GROUP BY layer, reason")
            ).all()
        family = GaugeMetricFamily("alphaforge_jobs", "Jobs by kind and status", labels=["kind", "status"])
        for kind, status, n in jobs:
            family.add_metric([kind, status], n)
        yield family
        family = GaugeMetricFamily("alphaforge_shards", "Shards by status", labels=["status"])
        for status, n in shards:
            family.add_metric([status], n)
        yield family
        counter = CounterMetricFamily(
            "alphaforge_sandbox_rejections",
            "Sandbox kills and refusals by layer and reason",
            labels=["layer", "reason"],
        )
        for layer, reason, n in rejections:
            counter.add_metric([layer, reason], n)
        yield counter
        try:
            yield from self._from_redis(svc.redis)
        except redis.RedisError:  # the broker is down: the PostgreSQL series still tell something
            log.warning("metrics: Redis unavailable, queue depths and latency histograms left out", exc_info=True)

    def _from_redis(self, client: redis.Redis) -> Iterator[Metric]:
        pipe = client.pipeline(transaction=False)
        for queue in QUEUE_NAMES:
            for priority in range(10):
                pipe.llen(queue if priority == 0 else f"{queue}{PRIORITY_SEP}{priority}")
        lengths = pipe.execute()
        family = GaugeMetricFamily("alphaforge_queue_depth", "Messages waiting per Celery queue", labels=["queue"])
        for i, queue in enumerate(QUEUE_NAMES):
            family.add_metric([queue], sum(lengths[i * 10 : (i + 1) * 10]))
        yield family
        yield _histogram(
            client, metrics_store.SHARD_LATENCY, metrics_store.SHARD_BUCKETS, "alphaforge_shard_duration_seconds",
            "Wall time of one shard task in a worker", ["kind"],
        )  # fmt: skip
        yield _histogram(
            client, metrics_store.API_LATENCY, metrics_store.API_BUCKETS, "alphaforge_api_request_duration_seconds",
            "API request latency by route", ["method", "route", "status"],
        )  # fmt: skip


def _histogram(client: Any, name: str, buckets: tuple[float, ...], metric: str, doc: str, labels: list[str]) -> Metric:
    family = HistogramMetricFamily(metric, doc, labels=labels)
    for series in metrics_store.read(client, name, buckets):
        family.add_metric([series.labels.get(label, "") for label in labels], series.buckets, series.total)
    return family


def _check_metrics_token() -> None:
    token = services().settings.metrics_token
    if not token:
        return
    given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
    if not hmac.compare_digest(given.encode(), token.encode()):
        raise Unauthorized(
            "metrics need the ALPHAFORGE_METRICS_TOKEN bearer token", details={"reason": "invalid_credentials"}
        )


@bp.get("/metrics", doc_ui=False)
def metrics() -> Response:
    _check_metrics_token()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector())
    return Response(generate_latest(registry), mimetype=None, content_type=PROMETHEUS_CONTENT_TYPE)


def init_request_metrics(app: Flask) -> None:
    """Every request's latency goes into the shared histogram, labelled with its route template (bounded)."""

    @app.before_request
    def _start() -> None:
        g.metrics_started = time.perf_counter()

    @app.after_request
    def _observe(response: Response) -> Response:
        started = g.get("metrics_started")
        if started is not None:
            route = request.url_rule.rule if request.url_rule is not None else "unmatched"
            labels = {"method": request.method, "route": route, "status": f"{response.status_code // 100}xx"}
            metrics_store.observe(services().redis, metrics_store.API_LATENCY, labels, time.perf_counter() - started,
                                  metrics_store.API_BUCKETS)  # fmt: skip
        return response
