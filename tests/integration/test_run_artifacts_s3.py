"""Run artifacts in an S3 bucket end to end: a real S3-protocol server (moto's, started here: S3 is outside the
product), a worker and an API configured with ``ALPHAFORGE_ARTIFACTS_URL=s3://...``, and everything through the
API: the run finishes, its artifacts are listed, downloaded and verified; an object altered or removed in the
bucket is detected; retention deletes a pruned run's objects.

The worker listens on a Redis database of its own, so only it (not the shared test worker, which writes to the
data directory) builds these runs' artifacts.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3  # type: ignore[import-untyped]
import pytest
import redis
from flask import Flask
from flask.testing import FlaskClient
from moto.server import ThreadedMotoServer
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from api import create_app
from shared.contract import create_celery
from shared.errors import ServiceUnavailable
from shared.infra.artifact_store import ArtifactStore
from shared.infra.config import ArtifactStorage, Settings
from shared.infra.models import RunManifest
from shared.jobs.backtests.retention import prune_runs
from tests.helpers import ApiUser, authed_client, seed_bars

PROJECT_ROOT = Path(__file__).resolve().parents[2]
S3_REDIS_DB = 9
BUCKET = "af-artifacts"
PREFIX = "runs/test"
RUNS = "/api/runs"


@dataclass(frozen=True)
class S3Stack:
    settings: Settings
    app: Flask
    s3: Any  # a boto3 S3 client: the test's own view of the bucket


@pytest.fixture(scope="module")
def s3_stack(settings: Settings) -> Iterator[S3Stack]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    base, _, _ = settings.require_redis_url().rpartition("/")
    s3_settings = settings.with_overrides(
        redis_url=f"{base}/{S3_REDIS_DB}",
        artifacts=ArtifactStorage(
            url=f"s3://{BUCKET}/{PREFIX}",
            s3_endpoint_url=endpoint,
            s3_region="us-east-1",
            s3_access_key_id="af-test-key",
            s3_secret_access_key="af-test-secret",
        ),
    )
    s3 = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="af-test-key",
        aws_secret_access_key="af-test-secret",
    )
    s3.create_bucket(Bucket=BUCKET)
    broker = redis.Redis.from_url(s3_settings.require_redis_url())
    broker.flushdb()
    log_path = settings.data_dir / "s3-worker.log"
    env = {**os.environ, **s3_settings.child_env(), "PYTHONUNBUFFERED": "1"}
    with open(log_path, "wb") as log_file:
        worker = subprocess.Popen(
            [sys.executable, "-m", "worker", "worker", "--hostname", f"s3-{os.getpid()}@%h"],
            cwd=PROJECT_ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    celery = create_celery(s3_settings)
    app = create_app(s3_settings)
    try:
        deadline = time.monotonic() + 60
        while not celery.control.ping(timeout=0.5):
            if worker.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"S3 test worker did not come up; log:\n{log_path.read_text()[-4000:]}")
        yield S3Stack(s3_settings, app, s3)
    finally:
        celery.close()
        app.extensions["alphaforge"].engine.dispose()
        if worker.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(worker.pid, signal.SIGTERM)
            try:
                worker.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait()
        broker.flushdb()
        broker.close()
        server.stop()


def wait_for_artifacts(client: FlaskClient, run_id: str, timeout_s: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        view: dict[str, Any] = client.get(f"{RUNS}/{run_id}/artifacts").get_json()
        if view["status"] == "ready":
            return view
        assert view["status"] == "pending", view
        assert time.monotonic() < deadline, f"no artifacts for {run_id} after {timeout_s} s"
        time.sleep(0.05)


def submit(client: FlaskClient, symbols: list[str], fast: int) -> str:
    body = {"symbols": symbols, "strategy": {"name": "dual_sma", "params": {"fast": fast, "slow": 25}}}
    response = client.post(RUNS, json=body)
    assert response.status_code == 202, response.get_json()
    run_id: str = response.get_json()["run_id"]
    return run_id


def keys_under(s3: Any, prefix: str) -> list[str]:
    listed = s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return sorted(o["Key"] for o in listed.get("Contents", []))


def test_artifacts_in_s3_end_to_end(
    s3_stack: S3Stack,
    user: ApiUser,
    other_user: ApiUser,
    engine: Engine,
    session_factory: sessionmaker[Session],
    settings: Settings,
) -> None:
    client = authed_client(s3_stack.app, user)
    s3 = s3_stack.s3
    seed_bars(engine, ["S3A", "S3B"], days=200, seed=31)
    run_id = submit(client, ["S3A", "S3B"], fast=5)
    view = wait_for_artifacts(client, run_id)
    names = [f["name"] for f in view["files"]]
    assert names == ["chart.png", "equity.csv", "metrics.json", "trades.csv"]

    # The objects are in the bucket under prefix/owner/run, and nothing went to the data directory.
    prefix = f"{PREFIX}/{user.id}/{run_id}"
    with engine.connect() as conn:
        location = conn.execute(select(RunManifest.location).where(RunManifest.job_id == run_id)).scalar_one()
    assert location == f"s3://{BUCKET}/{prefix}"
    assert keys_under(s3, prefix + "/") == sorted(f"{prefix}/{n}" for n in [*names, "manifest.json"])
    assert not (settings.data_dir / "artifacts" / user.id / run_id).exists()

    # Downloaded through the API: the bucket's bytes, matching the manifest.
    for entry in view["files"]:
        response = client.get(entry["url"])
        assert response.status_code == 200 and response.mimetype == entry["media_type"]
        assert hashlib.sha256(response.data).hexdigest() == entry["sha256"] and len(response.data) == entry["size"]
        assert response.data == s3.get_object(Bucket=BUCKET, Key=f"{prefix}/{entry['name']}")["Body"].read()
    manifest_bytes = client.get(view["manifest_url"]).data
    assert hashlib.sha256(manifest_bytes).hexdigest() == view["manifest_sha256"]
    assert json.loads(manifest_bytes)["run_id"] == run_id
    assert client.get(f"{RUNS}/{run_id}/manifest/verify").get_json()["ok"] is True

    # Tampering in the bucket: an altered object, then a removed one, each named; restored, all is well again.
    key = f"{prefix}/equity.csv"
    original = s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    s3.put_object(Bucket=BUCKET, Key=key, Body=original.replace(b"date", b"data", 1))
    check = client.get(f"{RUNS}/{run_id}/manifest/verify").get_json()
    assert check["ok"] is False and check["manifest_ok"] is True
    assert {f["name"]: f["problem"] for f in check["files"]}["equity.csv"] == "sha256 differs from the manifest"
    s3.put_object(Bucket=BUCKET, Key=key, Body=original)
    chart = s3.get_object(Bucket=BUCKET, Key=f"{prefix}/chart.png")["Body"].read()
    s3.delete_object(Bucket=BUCKET, Key=f"{prefix}/chart.png")
    check = client.get(f"{RUNS}/{run_id}/manifest/verify").get_json()
    assert {f["name"]: f["problem"] for f in check["files"]}["chart.png"] == "missing"
    assert client.get(f"{RUNS}/{run_id}/artifacts/chart.png").status_code == 404
    s3.put_object(Bucket=BUCKET, Key=f"{prefix}/manifest.json", Body=manifest_bytes + b" ")
    s3.put_object(Bucket=BUCKET, Key=f"{prefix}/chart.png", Body=chart)
    check = client.get(f"{RUNS}/{run_id}/manifest/verify").get_json()
    assert check["ok"] is False and check["manifest_file_ok"] is False and all(f["ok"] for f in check["files"])
    s3.put_object(Bucket=BUCKET, Key=f"{prefix}/manifest.json", Body=manifest_bytes)
    assert client.get(f"{RUNS}/{run_id}/manifest/verify").get_json()["ok"] is True

    # Someone else's run stays a 404 whatever the store.
    other = authed_client(s3_stack.app, other_user)
    assert other.get(f"{RUNS}/{run_id}/artifacts").status_code == 404
    assert other.get(f"{RUNS}/{run_id}/artifacts/chart.png").status_code == 404

    # Retention deletes a pruned run's objects through the same store; the newer run's stay and still verify.
    second = submit(client, ["S3A"], fast=7)
    second_view = wait_for_artifacts(client, second)
    assert second_view["chain_prev"] == view["manifest_sha256"]
    store = ArtifactStore.from_settings(s3_stack.settings)
    pruned = prune_runs(session_factory, store, keep=1)
    assert pruned.runs == 1 and pruned.artifact_dirs == 1
    assert keys_under(s3, prefix + "/") == []
    assert len(keys_under(s3, f"{PREFIX}/{user.id}/{second}/")) == 5
    assert client.get(f"{RUNS}/{second}/manifest/verify").get_json()["ok"] is True


def test_an_unreachable_store_is_a_503_not_a_500(s3_stack: S3Stack) -> None:
    # A port nothing listens on: obstore's bounded retries end in a clear "unavailable".
    config = ArtifactStorage(
        url=f"s3://{BUCKET}",
        s3_endpoint_url="http://127.0.0.1:9",
        s3_region="us-east-1",
        s3_access_key_id="k",
        s3_secret_access_key="s",
    )
    down = ArtifactStore(s3_stack.settings.data_dir, config)
    started = time.monotonic()
    with pytest.raises(ServiceUnavailable, match="artifact store"):
        down.get(f"s3://{BUCKET}/x/y", "metrics.json")
    assert time.monotonic() - started < 30
