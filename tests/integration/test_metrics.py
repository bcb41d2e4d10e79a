"""GET /metrics (Prometheus text) and GET /api/health/ready against the real servers and worker."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from flask.testing import FlaskClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine, text

from api import create_app
from shared.infra.config import Settings
from tests.helpers import seed_bars, wait_for_job

pytestmark = pytest.mark.usefixtures("celery_worker")


def scrape(
    client: FlaskClient, headers: dict[str, str] | None = None
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = client.get("/metrics", headers=headers or {})
    assert response.status_code == 200, response.data[:500]
    assert response.content_type.startswith("text/plain; version=0.0.4")
    samples = {}
    for family in text_string_to_metric_families(response.get_data(as_text=True)):
        for sample in family.samples:
            samples[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_count_jobs_shards_queues_and_latencies(
    client: FlaskClient, anon_client: FlaskClient, engine: Engine
) -> None:
    before = scrape(anon_client)  # public unless ALPHAFORGE_METRICS_TOKEN is set
    seed_bars(engine, ["M1", "M2", "M3"], days=10)
    body = {"script": "result = close[-1]", "column_name": "c", "stock_symbols": ["M1", "M2", "M3"]}
    job_id = client.post("/api/custom-calculations/execute", json=body).json["job_id"]  # type: ignore[index]
    assert wait_for_job(client, job_id)["status"] == "succeeded"
    after = scrape(anon_client)

    assert value(after, "alphaforge_jobs", kind="calculation", status="succeeded") == 1  # the table was emptied
    assert value(after, "alphaforge_shards", status="succeeded") == 1
    for queue in ("interactive", "bulk", "maintenance"):
        assert ("alphaforge_queue_depth", (("queue", queue),)) in after
    shards = "alphaforge_shard_duration_seconds_count"
    assert value(after, shards, kind="calculation") == value(before, shards, kind="calculation") + 1
    assert value(after, "alphaforge_shard_duration_seconds_bucket", kind="calculation", le="+Inf") == value(
        after, shards, kind="calculation"
    )
    polled = {"method": "GET", "route": "/api/jobs/<job_id>", "status": "2xx"}
    assert value(after, "alphaforge_api_request_duration_seconds_count", **polled) >= 1
    assert value(after, "alphaforge_api_request_duration_seconds_sum", **polled) > 0
    assert "alphaforge_sandbox_rejections" in client.get("/metrics").get_data(as_text=True)


def test_metrics_token_when_configured(settings: Settings, anon_client: FlaskClient) -> None:
    app = create_app(settings.with_overrides(metrics_token="m" * 32))
    try:
        guarded = app.test_client()
        denied = guarded.get("/metrics")
        assert denied.status_code == 401 and denied.json["error"]["code"] == "unauthorized"  # type: ignore[index]
        assert guarded.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert guarded.get("/metrics", headers={"Authorization": "Bearer " + "m" * 32}).status_code == 200
    finally:
        app.extensions["alphaforge"].engine.dispose()


@pytest.fixture
def no_worker_app(settings: Settings) -> Iterator[FlaskClient]:
    base, _, _ = settings.require_redis_url().rpartition("/")
    app = create_app(settings.with_overrides(redis_url=f"{base}/11"))  # a broker no worker listens on
    yield app.test_client()
    app.extensions["alphaforge"].engine.dispose()


def test_ready_needs_database_at_head_broker_and_a_worker(
    anon_client: FlaskClient, engine: Engine, no_worker_app: FlaskClient
) -> None:
    ready = anon_client.get("/api/health/ready")
    assert ready.status_code == 200, ready.json
    body = ready.json
    assert body["status"] == "ready" and body["workers"]["count"] >= 1  # type: ignore[index]
    assert body["database"]["revision"] == body["database"]["expected"]  # type: ignore[index]
    assert re.fullmatch(r"\d{4}_?\w*", body["database"]["expected"][0])  # type: ignore[index]

    not_ready = no_worker_app.get("/api/health/ready")
    assert not_ready.status_code == 503 and not_ready.json["workers"] == {  # type: ignore[index]
        "ok": False, "count": 0, "latency_ms": not_ready.json["workers"]["latency_ms"]  # type: ignore[index]
    }  # fmt: skip

    with engine.begin() as conn:
        head = conn.scalar(text("SELECT version_num FROM alembic_version"))
        conn.execute(text("UPDATE alembic_version SET version_num = '0001'"))
    try:
        behind = anon_client.get("/api/health/ready")
        assert behind.status_code == 503 and behind.json["database"]["ok"] is False  # type: ignore[index]
        assert behind.json["database"]["revision"] == ["0001"]  # type: ignore[index]
    finally:
        with engine.begin() as conn:
            conn.execute(text("UPDATE alembic_version SET version_num = :v"), {"v": head})
    assert anon_client.get("/api/health/ready").status_code == 200
