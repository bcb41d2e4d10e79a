"""Webhooks: SSRF checks, HMAC signatures, bounded retries with backoff, attempts visible on the job; calculation
jobs and backtest runs alike, the first attempt made by the worker that saw the job end (no beat runs here).

The webhook tests run against a worker of their own (its own Redis database) whose operator allows private
targets: the receiver listens on loopback, and the session's worker (private targets refused, the default) would
make its prompt first attempt fail."""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import hmac
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import redis
from flask.testing import FlaskClient
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from api import create_app
from shared.contract import create_celery
from shared.infra.config import Settings, Webhooks
from shared.infra.migrate import PROJECT_ROOT
from shared.infra.models import Job, JobKind, User
from shared.jobs import pipeline as jobs
from shared.jobs import webhooks
from tests.helpers import FINAL, authed_client, make_user, seed_bars, wait_for_job

HOOKS_REDIS_DB = 12
BACKOFF_S = 0.2
MAX_ATTEMPTS = 3

PUBLIC = "93.184.216.34"


@pytest.mark.parametrize(
    ("url", "addresses", "reason"),
    [
        ("ftp://example.com/x", [PUBLIC], "only http and https"),
        ("http:///nohost", [PUBLIC], "no host"),
        ("http://user:pw@example.com/", [PUBLIC], "credentials"),
        ("http://localhost/hook", ["127.0.0.1"], "non-public"),
        ("http://metadata/latest", ["169.254.169.254"], "non-public"),
        ("http://intranet/hook", ["10.1.2.3"], "non-public"),
        ("https://cgnat.example/", ["100.64.0.1"], "non-public"),
        ("http://six.example/", ["::1"], "non-public"),
        ("http://mixed.example/", [PUBLIC, "192.168.1.5"], "non-public"),
    ],
)
def test_unsafe_urls_are_refused(url: str, addresses: list[str], reason: str) -> None:
    with pytest.raises(webhooks.UnsafeUrl, match=reason):
        webhooks.check_url(url, allow_private=False, resolver=lambda host, port: addresses)


def test_public_urls_pass_and_private_ones_only_when_allowed() -> None:
    host, port, found = webhooks.check_url("https://hooks.example.com/x?y=1", allow_private=False,
                                           resolver=lambda h, p: [PUBLIC])  # fmt: skip
    assert (host, port, found) == ("hooks.example.com", 443, [PUBLIC])
    assert webhooks.check_url("http://127.0.0.1:9/x", allow_private=True)[2] == ["127.0.0.1"]
    with pytest.raises(webhooks.UnsafeUrl):
        webhooks.check_url("http://127.0.0.1:9/x", allow_private=False)


@dataclass
class Receiver:
    """A real HTTP server on 127.0.0.1 that answers ``codes`` in turn (then 200) and records what it got."""

    codes: list[int]
    received: list[dict[str, Any]] = field(default_factory=list)
    url: str = ""


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    rec = Receiver(codes=[])

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            rec.received.append({"headers": dict(self.headers), "body": body, "path": self.path})
            code = rec.codes.pop(0) if rec.codes else 200
            self.send_response(code)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    rec.url = f"http://127.0.0.1:{server.server_address[1]}/hooks/alphaforge?source=test"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield rec
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def hook_settings(settings: Settings) -> Iterator[Settings]:
    """Private webhook targets allowed, short backoff, a Redis database of their own."""
    base, _, _db = settings.require_redis_url().rpartition("/")
    hooks = settings.with_overrides(
        redis_url=f"{base}/{HOOKS_REDIS_DB}",
        webhooks=Webhooks(allow_private=True, max_attempts=MAX_ATTEMPTS, backoff_s=BACKOFF_S, timeout_s=5),
    )
    client = redis.Redis.from_url(hooks.require_redis_url())
    client.flushdb()
    yield hooks
    client.flushdb()
    client.close()


@pytest.fixture(scope="module")
def hook_worker(hook_settings: Settings) -> Iterator[subprocess.Popen[bytes]]:
    """A real worker on ``hook_settings`` (every queue, so the maintenance queue's delivery task too)."""
    log_path = hook_settings.data_dir / "hook-worker.log"
    env = {**os.environ, **hook_settings.child_env(), "PYTHONUNBUFFERED": "1"}
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "worker", "worker", "--hostname", "hooks@%h"], cwd=PROJECT_ROOT,
                                env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    app = create_celery(hook_settings)
    try:
        deadline = time.monotonic() + 60
        while not app.control.ping(timeout=0.5):
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
        yield proc
    finally:
        app.close()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture
def hook_client(
    hook_settings: Settings, hook_worker: subprocess.Popen[bytes], api_state: Engine, test_password_hash: str
) -> Iterator[FlaskClient]:
    """An API (and worker) whose operator allows private webhook targets (the receiver is on loopback)."""
    app = create_app(hook_settings)
    yield authed_client(app, make_user(app, api_state, "hooker", test_password_hash))
    app.extensions["alphaforge"].engine.dispose()


def longest_wait(low: float, high: float) -> float:
    """The top of the full-jitter window: retries scheduled here wait the whole doubled backoff."""
    return high


def deliver_until_settled(factory: sessionmaker[Session], max_attempts: int, timeout_s: float = 30) -> None:
    """What beat's poll does (no beat runs here): the retries after the worker's first attempt."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        webhooks.dispatch(factory, allow_private=True, max_attempts=max_attempts, backoff_base_s=BACKOFF_S,
                          timeout_s=5, uniform=longest_wait)  # fmt: skip
        with factory() as session:
            pending = session.execute(
                webhooks.select(webhooks.Job.id).where(webhooks.Job.callback_state == "pending")
            ).first()
        if pending is None:
            return
        time.sleep(0.1)
    raise AssertionError("webhook deliveries did not settle")


def verify_signature(secret: str, got: dict[str, Any]) -> dict[str, Any]:
    stamp, signature = (part.split("=", 1)[1] for part in got["headers"]["X-AlphaForge-Signature"].split(","))
    expected = hmac.new(secret.encode(), f"{stamp}.".encode() + got["body"], hashlib.sha256).hexdigest()
    assert hmac.compare_digest(signature, expected)
    summary: dict[str, Any] = json.loads(got["body"])
    return summary


def test_signed_summary_retried_with_backoff_until_delivered(
    hook_client: FlaskClient, client: FlaskClient, engine: Engine, session_factory: sessionmaker[Session],
    receiver: Receiver,
) -> None:  # fmt: skip
    seed_bars(engine, ["W1", "W2"], days=10)
    body = {"script": "result = close[-1]", "column_name": "c", "stock_symbols": ["W1", "W2"]}
    refused = client.post("/api/custom-calculations/execute", json={**body, "callback_url": receiver.url})
    assert refused.status_code == 422 and "non-public" in refused.json["error"]["message"]  # type: ignore[index]

    receiver.codes = [500, 503]
    accepted = hook_client.post("/api/custom-calculations/execute", json={**body, "callback_url": receiver.url})
    assert accepted.status_code == 202, accepted.json
    job_id = accepted.json["job_id"]  # type: ignore[index]
    job = wait_for_job(hook_client, job_id)
    assert job["callback"]["url"] == receiver.url
    deliver_until_settled(session_factory, max_attempts=5)

    viewed: dict[str, Any] = hook_client.get(f"/api/jobs/{job_id}").json  # type: ignore[assignment]
    assert viewed["callback"] == {
        "url": receiver.url, "state": "delivered", "attempts": 3, "next_attempt_at": None, "last_error": None
    }  # fmt: skip
    attempts = hook_client.get(f"/api/jobs/{job_id}/callback-deliveries").json["deliveries"]  # type: ignore[index]
    assert [(a["attempt"], a["status_code"]) for a in attempts] == [(1, 500), (2, 503), (3, 200)]
    assert attempts[0]["error"] == "HTTP 500"
    assert client.get(f"/api/jobs/{job_id}/callback-deliveries").status_code == 404  # someone else's job

    secret = hook_client.get("/api/auth/webhook-secret").json["secret"]  # type: ignore[index]
    assert len(receiver.received) == 3
    for got in receiver.received:
        assert got["path"] == "/hooks/alphaforge?source=test"
        summary = verify_signature(secret, got)
        assert summary["event"] == "job.finished" and got["headers"]["X-AlphaForge-Event"] == "job.finished"
        assert summary["job_id"] == job_id and summary["status"] == "succeeded"
        assert summary["progress"]["symbols_done"] == 2
    stamps = [int(g["headers"]["X-AlphaForge-Signature"].split(",")[0][2:]) for g in receiver.received]
    assert stamps == sorted(stamps)

    rotated = hook_client.post("/api/auth/webhook-secret/rotate").json["secret"]  # type: ignore[index]
    assert rotated != secret and hook_client.get("/api/auth/webhook-secret").json["secret"] == rotated  # type: ignore[index]


def test_delivery_gives_up_after_the_bounded_attempts(
    hook_client: FlaskClient, engine: Engine, session_factory: sessionmaker[Session], receiver: Receiver
) -> None:
    seed_bars(engine, ["X1"], days=5)
    receiver.codes = [500] * 10
    body = {"script": "result = 1", "column_name": "c", "stock_symbols": ["X1"], "callback_url": receiver.url}
    job_id = hook_client.post("/api/custom-calculations/execute", json=body).json["job_id"]  # type: ignore[index]
    wait_for_job(hook_client, job_id)
    deliver_until_settled(session_factory, max_attempts=MAX_ATTEMPTS)
    callback = hook_client.get(f"/api/jobs/{job_id}").json["callback"]  # type: ignore[index]
    assert callback["state"] == "failed" and callback["attempts"] == 3 and callback["last_error"] == "HTTP 500"
    assert len(receiver.received) == 3
    attempts = hook_client.get(f"/api/jobs/{job_id}/callback-deliveries").json["deliveries"]  # type: ignore[index]
    made = [dt.datetime.fromisoformat(a["created_at"]) for a in attempts]
    gaps = [(later - earlier).total_seconds() for earlier, later in itertools.pairwise(made)]
    # Attempt 2 may come at once (the worker drew its wait from the full-jitter window [0, BACKOFF_S]); this
    # test's poll made attempt 2 and scheduled attempt 3 at the top of its window, which doubled: it was waited.
    assert gaps[1] >= 2 * BACKOFF_S


RUN_BODY = {
    "symbols": ["HK1", "HK2"],
    "strategy": {"name": "dual_sma", "params": {"fast": 5, "slow": 20}},
}


def test_a_backtest_run_calls_back_as_soon_as_it_ends(
    hook_client: FlaskClient, client: FlaskClient, engine: Engine, receiver: Receiver
) -> None:
    """No beat and no dispatch by the test: the worker that finished the run's last shard starts the delivery."""
    seed_bars(engine, ["HK1", "HK2"], days=120)
    refused = client.post("/api/runs", json={**RUN_BODY, "callback_url": receiver.url})
    assert refused.status_code == 422 and "non-public" in refused.get_data(as_text=True), refused.json
    bad = hook_client.post("/api/runs", json={**RUN_BODY, "callback_url": 42})
    assert bad.status_code == 422 and "callback_url" in bad.get_data(as_text=True), bad.json

    accepted = hook_client.post("/api/runs", json={**RUN_BODY, "callback_url": receiver.url})
    assert accepted.status_code == 202, accepted.json
    run_id = accepted.json["run_id"]  # type: ignore[index]
    deadline = time.monotonic() + 120
    run: dict[str, Any] = hook_client.get(f"/api/runs/{run_id}").json  # type: ignore[assignment]
    while run["status"] not in FINAL:
        assert time.monotonic() < deadline, run
        time.sleep(0.1)
        run = hook_client.get(f"/api/runs/{run_id}").json  # type: ignore[assignment]
    ended = time.monotonic()
    while not receiver.received:
        assert time.monotonic() - ended < 10, "no webhook within 10 s of the run's end"
        time.sleep(0.05)
    delivered_after_s = time.monotonic() - ended
    job: dict[str, Any] = hook_client.get(f"/api/jobs/{run_id}").json  # type: ignore[assignment]
    while job["callback"]["state"] == "pending":  # the attempt's row commits just after the receiver answered
        time.sleep(0.05)
        job = hook_client.get(f"/api/jobs/{run_id}").json  # type: ignore[assignment]
    assert job["callback"] == {
        "url": receiver.url, "state": "delivered", "attempts": 1, "next_attempt_at": None, "last_error": None
    }  # fmt: skip
    assert hook_client.get(f"/api/runs/{run_id}").json["callback"] == job["callback"]  # type: ignore[index]
    attempts = hook_client.get(f"/api/jobs/{run_id}/callback-deliveries").json["deliveries"]  # type: ignore[index]
    assert [(a["attempt"], a["status_code"]) for a in attempts] == [(1, 200)]

    (got,) = receiver.received
    secret = hook_client.get("/api/auth/webhook-secret").json["secret"]  # type: ignore[index]
    summary = verify_signature(secret, got)
    assert got["headers"]["X-AlphaForge-Event"] == "run.finished" and summary["event"] == "run.finished"
    assert summary["job_id"] == run_id and summary["kind"] == "backtest" and summary["status"] == run["status"]
    assert summary["progress"]["symbols_done"] == 2
    assert summary["links"]["self"] == f"/api/runs/{run_id}"
    print(f"\n[webhooks] run {run['status']}: webhook received {delivered_after_s:.2f} s after the run ended")


def test_a_job_cancelled_with_no_shard_running_calls_back_at_once(
    hook_client: FlaskClient, engine: Engine, receiver: Receiver
) -> None:
    """No shard task will end to start the delivery (none was ever published here): the cancel itself does, with
    no beat running."""
    app = hook_client.application
    factory = app.extensions["alphaforge"].session_factory
    with factory() as session:
        owner_id = session.scalar(select(User.id).where(User.username == "hooker"))
    job = Job(kind=JobKind.CALCULATION.value, owner_id=owner_id, column_name="c", script="result = 1",
              script_sha256="0" * 64, symbols=["A"], symbols_sha256="0" * 64, params={},
              callback_url=receiver.url, callback_state="pending")  # fmt: skip
    jobs.submit(factory, job, 50, lambda tasks: None)  # queued, its shard's task never sent
    cancelled = hook_client.post(f"/api/jobs/{job.id}/cancel")
    assert cancelled.status_code == 200 and cancelled.json["status"] == "cancelled", cancelled.json  # type: ignore[index]
    deadline = time.monotonic() + 10
    while not receiver.received:
        assert time.monotonic() < deadline, "no webhook within 10 s of the cancel"
        time.sleep(0.05)
    (got,) = receiver.received
    summary = verify_signature(hook_client.get("/api/auth/webhook-secret").json["secret"], got)  # type: ignore[index]
    assert summary["job_id"] == str(job.id) and summary["status"] == "cancelled"
