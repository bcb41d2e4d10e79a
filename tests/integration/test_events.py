"""Job lifecycle events: Redis streams written by the job service, served as SSE by a real gunicorn server
(the launcher's own command line) and as JSON pages with ETags."""

from __future__ import annotations

import contextlib
import datetime as dt
import http.client
import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import psutil
import pytest
import redis
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import Engine, func, update

from api.events import HEARTBEAT_CONFIG_KEY
from shared.infra.config import Settings
from shared.infra.events import RedisJobEvents
from shared.infra.models import Job, JobKind
from shared.jobs import pipeline as jobs
from shared.ops.launcher import child_commands
from tests.conftest import PROJECT_ROOT, _stop_process_group
from tests.helpers import ApiUser, seed_bars, wait_for_job

pytestmark = pytest.mark.slow  # scheduled first (tests/conftest.py)

SYMBOLS = [f"EV{i:02d}" for i in range(12)]
SHARD_SIZE = 3  # 12 symbols -> 4 shards


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def running_api(settings: Settings, **env: str) -> Iterator[tuple[str, int]]:
    """The API as ``up`` runs it (gunicorn, threaded workers), on a free port, with shards of 3 symbols."""
    with running_api_process(settings, **env) as (server, _):
        yield server


@contextlib.contextmanager
def running_api_process(settings: Settings, **env: str) -> Iterator[tuple[tuple[str, int], subprocess.Popen[bytes]]]:
    """``running_api``, with the gunicorn master process."""
    server_settings = settings.with_overrides(api_port=_free_port(), shard_size=SHARD_SIZE)
    [command] = [cmd for name, cmd in child_commands(server_settings) if name == "api"]
    assert settings.jwt_secret_key
    env = {**os.environ, **server_settings.child_env(), "JWT_SECRET_KEY": settings.jwt_secret_key, **env}
    log_path = settings.data_dir / f"gunicorn-events-test-{server_settings.api_port}.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(command, cwd=PROJECT_ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
    host, port = server_settings.api_host, server_settings.api_port
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                conn = http.client.HTTPConnection(host, port, timeout=2)
                conn.request("GET", "/api/openapi.json")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"gunicorn did not come up; log:\n{log_path.read_text()[-4000:]}")
            time.sleep(0.05)
        yield (host, port), proc
    finally:
        _stop_process_group(proc)


@pytest.fixture(scope="module")
def api_server(settings: Settings) -> Iterator[tuple[str, int]]:
    with running_api(settings) as server:
        yield server


def request_json(server: tuple[str, int], method: str, path: str, user: ApiUser, body: Any = None) -> Any:
    conn = http.client.HTTPConnection(*server, timeout=30)
    headers = {**user.headers, "Content-Type": "application/json"}
    conn.request(method, path, body=json.dumps(body) if body is not None else None, headers=headers)
    response = conn.getresponse()
    payload = json.loads(response.read() or b"null")
    assert response.status < 300, (response.status, payload)
    return payload


class StreamRefused(Exception):
    def __init__(self, status: int, retry_after: str | None, body: dict[str, Any]) -> None:
        super().__init__(status, body)
        self.status, self.retry_after, self.body = status, retry_after, body


class SseReader:
    """A minimal server-sent events client over http.client (a real HTTP connection)."""

    def __init__(self, server: tuple[str, int], path: str, user: ApiUser, last_event_id: str | None = None) -> None:
        self.conn = http.client.HTTPConnection(*server, timeout=30)
        headers = {**user.headers, "Accept": "text/event-stream"}
        if last_event_id:
            headers["Last-Event-ID"] = last_event_id
        self.conn.request("GET", path, headers=headers)
        self.response = self.conn.getresponse()
        if self.response.status != 200:
            raise StreamRefused(self.response.status, self.response.getheader("Retry-After"),
                                json.loads(self.response.read()))  # fmt: skip
        assert self.response.getheader("Content-Type", "").startswith("text/event-stream")
        self.comments: list[str] = []

    def next_event(self) -> dict[str, Any] | None:
        """The next event (id, type, data), or None at the end of the stream."""
        fields: dict[str, Any] = {}
        while True:
            raw = self.response.readline()
            if not raw:
                return None
            line = raw.decode().rstrip("\n")
            if not line:
                if "type" in fields:
                    return fields
                continue
            if line.startswith(":"):
                self.comments.append(line)
            elif line.startswith("id: "):
                fields["id"] = line[4:]
            elif line.startswith("event: "):
                fields["type"] = line[7:]
            elif line.startswith("data: "):
                fields["data"] = json.loads(line[6:])

    def close(self) -> None:
        self.conn.close()


def test_sse_over_http_with_resume(
    api_server: tuple[str, int], user: ApiUser, engine: Engine, celery_worker: Any
) -> None:
    seed_bars(engine, SYMBOLS, days=300, seed=5)
    body = {"symbols": SYMBOLS, "strategy": {"name": "dual_sma", "params": {"fast": 5, "slow": 30}}}
    run = request_json(api_server, "POST", "/api/runs", user, body)
    run_id = run["run_id"]
    assert run["shards"] == 4 and run["links"]["events"] == f"/api/runs/{run_id}/events"

    first = SseReader(api_server, f"/api/runs/{run_id}/events", user)
    head = [first.next_event(), first.next_event()]
    first.close()  # the client goes away after two events
    assert head[0] is not None and head[0]["type"] == "queued"
    assert head[0]["data"] == {"kind": "backtest", "shards": 4, "symbols": 12}
    assert head[1] is not None

    resumed = SseReader(api_server, f"/api/runs/{run_id}/events", user, last_event_id=head[1]["id"])
    rest = []
    while (event := resumed.next_event()) is not None:
        rest.append(event)
    resumed.close()  # the server ended the stream after the terminal event
    assert rest and rest[-1]["type"] == "finished" and rest[-1]["data"]["status"] == "succeeded"
    assert rest[-1]["data"]["symbols_done"] == 12

    streamed = [e for e in head if e] + rest
    ids = [e["id"] for e in streamed]
    assert ids == sorted(ids, key=lambda i: tuple(map(int, i.split("-")))) and len(set(ids)) == len(ids)
    kinds = [e["type"] for e in streamed]
    assert kinds.count("shard_started") == 4 and kinds.count("shard_finished") == 4
    finished = [e["data"] for e in streamed if e["type"] == "shard_finished"]
    assert sorted(d["shard"] for d in finished) == [0, 1, 2, 3]
    assert [d["shards_done"] for d in finished] == [1, 2, 3, 4]  # counters as each shard committed
    assert all(d["symbols"] == 3 and d["failed"] == 0 for d in finished)

    # The same events, in the same order with the same ids, from the non-streaming variant, on any server.
    page = request_json(api_server, "GET", f"/api/runs/{run_id}/events", user)
    assert [e["id"] for e in page["events"]] == ids and page["done"] is True
    # A stream opened after the end replays everything from the start and closes.
    replay = SseReader(api_server, f"/api/jobs/{run_id}/events", user)
    again = []
    while (event := replay.next_event()) is not None:
        again.append(event)
    assert [e["id"] for e in again] == ids


def test_open_streams_do_not_block_the_server(
    api_server: tuple[str, int], flask_app: Flask, user: ApiUser, settings: Settings
) -> None:
    """Four streams held open on a job that never moves (more than the two gunicorn workers): other requests
    are still answered (threaded workers), and every stream gets its heartbeat-free first events."""
    factory = flask_app.extensions["alphaforge"].session_factory
    events = RedisJobEvents(redis.Redis.from_url(settings.require_redis_url()))
    job = jobs.submit(factory, idle_job(user), 50, lambda tasks: None, events=events)
    streams = [SseReader(api_server, f"/api/jobs/{job.id}/events", user) for _ in range(4)]
    try:
        for stream in streams:
            first = stream.next_event()
            assert first is not None and first["type"] == "queued"
        started = time.monotonic()
        view = request_json(api_server, "GET", f"/api/jobs/{job.id}", user)
        assert view["status"] == "queued" and time.monotonic() - started < 5
        request_json(api_server, "POST", f"/api/jobs/{job.id}/cancel", user)
        for stream in streams:
            last = stream.next_event()
            assert last is not None and last["type"] == "cancelled"
            assert stream.next_event() is None
    finally:
        for stream in streams:
            stream.close()


def test_stream_limits_keep_threads_for_other_requests(
    flask_app: Flask, settings: Settings, user: ApiUser, other_user: ApiUser, admin_user: ApiUser
) -> None:
    """One gunicorn process with 4 threads, at most 2 streams, 1 per user: a user's second stream is a 429, a
    stream beyond the server's limit a 503 (both with Retry-After, in the one error shape), ordinary requests are
    still served, and a stream that ends gives its slot back."""
    factory = flask_app.extensions["alphaforge"].session_factory
    events = RedisJobEvents(redis.Redis.from_url(settings.require_redis_url()))
    mine = jobs.submit(factory, idle_job(user), 50, lambda tasks: None, events=events)
    theirs = jobs.submit(factory, idle_job(other_user), 50, lambda tasks: None, events=events)
    limits = {"ALPHAFORGE_API_WORKERS": "1", "ALPHAFORGE_API_THREADS": "4", "ALPHAFORGE_SSE_MAX_STREAMS": "2",
              "ALPHAFORGE_SSE_MAX_STREAMS_PER_USER": "1"}  # fmt: skip
    with running_api(settings, **limits) as server:
        streams = [SseReader(server, f"/api/jobs/{mine.id}/events", user)]
        try:
            with pytest.raises(StreamRefused) as per_user:
                SseReader(server, f"/api/jobs/{mine.id}/events", user)
            assert per_user.value.status == 429 and per_user.value.retry_after == "5"
            assert per_user.value.body["error"]["details"] == {"limit": 1}
            streams.append(SseReader(server, f"/api/jobs/{theirs.id}/events", other_user))
            with pytest.raises(StreamRefused) as full:
                SseReader(server, f"/api/jobs/{mine.id}/events", admin_user)
            assert full.value.status == 503 and full.value.retry_after == "5"
            assert full.value.body["error"]["code"] == "capacity_exhausted"
            # The two threads left serve everything else, the JSON events included.
            started = time.monotonic()
            page = request_json(server, "GET", f"/api/jobs/{mine.id}/events", admin_user)
            assert [e["type"] for e in page["events"]] == ["queued"]
            assert time.monotonic() - started < 5
            request_json(server, "POST", f"/api/jobs/{mine.id}/cancel", user)
            assert [streams[0].next_event() for _ in range(2)][-1]["type"] == "cancelled"  # type: ignore[index]
            assert streams[0].next_event() is None  # the server ended the stream: its slot is free again
            deadline = time.monotonic() + 10
            while True:
                try:
                    replay = SseReader(server, f"/api/jobs/{mine.id}/events", admin_user)
                    break
                except StreamRefused:  # the server closes the finished response just after the last byte
                    assert time.monotonic() < deadline
                    time.sleep(0.1)
            assert [e["type"] for e in iter(replay.next_event, None)] == ["queued", "cancelled"]
            replay.close()
        finally:
            for stream in streams:
                stream.close()


def idle_job(user: ApiUser) -> Job:
    return Job(
        kind=JobKind.CALCULATION.value,
        owner_id=user.id,
        column_name="c",
        script="result = 1",
        script_sha256="0" * 64,
        symbols=["A"],
        symbols_sha256="0" * 64,
        params={},
    )


def test_event_pages_with_etags(client: FlaskClient, user: ApiUser, engine: Engine, celery_worker: Any) -> None:
    seed_bars(engine, ["ET1", "ET2"], days=40)
    response = client.post(
        "/api/custom-calculations/execute",
        json={"script": "result = close[-1]", "column_name": "c", "stock_symbols": ["ET1", "ET2", "NOPE"]},
    )
    assert response.status_code == 202
    job_id = response.get_json()["job_id"]
    wait_for_job(client, job_id)
    deadline = time.monotonic() + 10
    while not (page := client.get(f"/api/jobs/{job_id}/events")).get_json()["done"]:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    body = page.get_json()
    assert [e["type"] for e in body["events"]] == ["queued", "shard_started", "shard_finished", "finished"]
    assert body["events"][-1]["data"]["status"] == "partial"
    assert body["events"][2]["data"]["failed"] == 1
    etag = page.headers["ETag"]
    assert client.get(f"/api/jobs/{job_id}/events", headers={"If-None-Match": etag}).status_code == 304

    last = body["last_id"]
    empty = client.get(f"/api/jobs/{job_id}/events?after_id={last}")
    assert empty.status_code == 200 and empty.get_json()["events"] == [] and empty.get_json()["last_id"] == last
    not_modified = client.get(
        f"/api/jobs/{job_id}/events?after_id={last}", headers={"If-None-Match": empty.headers["ETag"]}
    )
    assert not_modified.status_code == 304 and not_modified.data == b""
    two = client.get(f"/api/jobs/{job_id}/events?limit=2").get_json()
    assert [e["id"] for e in two["events"]] == [e["id"] for e in body["events"][:2]] and not two["done"]
    after_two = client.get(f"/api/jobs/{job_id}/events?after_id={two['last_id']}").get_json()
    assert [e["id"] for e in after_two["events"]] == [e["id"] for e in body["events"][2:]]
    assert client.get(f"/api/jobs/{job_id}/events", headers={"Last-Event-ID": two["last_id"]}).get_json() == after_two

    bad = client.get(f"/api/jobs/{job_id}/events?after_id=yesterday")
    assert bad.status_code == 422 and bad.get_json()["error"]["details"]["errors"][0]["field"] == "after_id"
    bad_header = client.get(f"/api/jobs/{job_id}/events", headers={"Last-Event-ID": "x"})
    assert bad_header.status_code == 422
    # A calculation job is not a run.
    assert client.get(f"/api/runs/{job_id}/events").status_code == 404


def test_events_need_ownership(
    client: FlaskClient, other_client: FlaskClient, engine: Engine, celery_worker: Any
) -> None:
    seed_bars(engine, ["OWN"], days=30)
    response = client.post(
        "/api/custom-calculations/execute", json={"script": "result = 1", "column_name": "c", "stock_symbols": ["OWN"]}
    )
    job_id = response.get_json()["job_id"]
    for path in (f"/api/jobs/{job_id}/events", "/api/jobs/not-a-uuid/events"):
        got = other_client.get(path)
        assert got.status_code == 404 and got.get_json()["error"]["code"] == "not_found"


def test_heartbeat_cancel_and_recovered_terminal_event(
    flask_app: Flask, client: FlaskClient, user: ApiUser, engine: Engine, settings: Settings
) -> None:
    """A job that stays queued (nothing was enqueued): heartbeat comments, then its cancellation ends the
    stream; and a job final in the database whose terminal event was never written gets one from the reader."""
    factory = flask_app.extensions["alphaforge"].session_factory
    events = RedisJobEvents(redis.Redis.from_url(settings.require_redis_url()))
    job = jobs.submit(
        factory,
        idle_job(user),
        50,
        lambda tasks: None,  # never reaches a worker
        events=events,
    )
    flask_app.config[HEARTBEAT_CONFIG_KEY] = 0.3
    try:
        response = client.get(f"/api/jobs/{job.id}/events", headers={"Accept": "text/event-stream"}, buffered=False)
        chunks = (bytes(chunk) for chunk in response.response)  # type: ignore[arg-type]
        assert next(chunks).startswith(b"retry: ")
        queued = next(chunks).decode()
        assert queued.startswith("id: ") and "event: queued" in queued
        assert next(chunks) == b": heartbeat\n\n"
        assert next(chunks) == b": heartbeat\n\n"
        assert client.post(f"/api/jobs/{job.id}/cancel").status_code == 200
        cancelled = next(chunks).decode()
        assert "event: cancelled" in cancelled
        assert list(chunks) == []  # closed after the terminal event
        response.close()
    finally:
        flask_app.config.pop(HEARTBEAT_CONFIG_KEY)

    # Final in the database for a while, no terminal event in the stream (a lost publish): the reader writes it.
    silent = jobs.submit(
        factory,
        idle_job(user),
        50,
        lambda tasks: None,
    )
    with engine.begin() as conn:
        conn.execute(
            update(Job)
            .where(Job.id == silent.id)
            .values(status="failed", finished_at=func.now() - dt.timedelta(minutes=1))
        )
    page = client.get(f"/api/jobs/{silent.id}/events").get_json()
    assert [e["type"] for e in page["events"]] == ["failed"] and page["done"]
    assert page["events"][0]["data"]["recovered"] is True
    again = client.get(f"/api/jobs/{silent.id}/events").get_json()
    assert again["events"] == page["events"]  # written once


def _open_stream(server: tuple[str, int], path: str, user: ApiUser, deadline_s: float = 30) -> SseReader:
    """A stream, retried while the API refuses it: a 503 (the process the connection reached is at its own
    limit) or a 429 (a slot the user gave up is not free yet)."""
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            return SseReader(server, path, user)
        except StreamRefused as refused:
            assert refused.status in (429, 503) and time.monotonic() < deadline, refused.body
            time.sleep(0.1)


def _alive(stream: SseReader, for_s: float = 2.0) -> bool:
    """The stream still sends after ``for_s`` of reading (its heartbeats come every 0.5 s here), or it ended
    with its process (what was buffered before the end is read first, then the end)."""
    deadline = time.monotonic() + for_s
    try:
        while time.monotonic() < deadline:
            if not stream.response.readline():
                return False
    except OSError:
        return False
    return True


def test_per_user_stream_limit_holds_across_api_processes(
    flask_app: Flask, settings: Settings, user: ApiUser, other_user: ApiUser
) -> None:
    """Two gunicorn worker processes, each allowed 3 streams, one user allowed 4: the user's 4 streams are
    necessarily spread over both processes, and a 5th is a 429 on either (counted per process it would be a 200
    or a 503); closing one frees a slot; the slots of a killed process lapse after their lease."""
    factory = flask_app.extensions["alphaforge"].session_factory
    events = RedisJobEvents(redis.Redis.from_url(settings.require_redis_url()))
    job = jobs.submit(factory, idle_job(user), 50, lambda tasks: None, events=events)
    path = f"/api/jobs/{job.id}/events"
    limits = {"ALPHAFORGE_API_WORKERS": "2", "ALPHAFORGE_API_THREADS": "8", "ALPHAFORGE_SSE_MAX_STREAMS": "3",
              "ALPHAFORGE_SSE_MAX_STREAMS_PER_USER": "4", "ALPHAFORGE_SSE_HEARTBEAT_S": "0.5",
              "ALPHAFORGE_SSE_SLOT_LEASE_S": "4"}  # fmt: skip
    with running_api_process(settings, **limits) as (server, master):
        streams = [_open_stream(server, path, user) for _ in range(4)]
        try:
            for _ in range(6):  # whichever process the connection reaches: the user is at the limit
                with pytest.raises(StreamRefused) as refused:
                    SseReader(server, path, user)
                assert refused.value.status == 429 and refused.value.retry_after == "5", refused.value.body
                assert refused.value.body["error"]["details"] == {"limit": 4}
            theirs = jobs.submit(factory, idle_job(other_user), 50, lambda tasks: None, events=events)
            other = _open_stream(server, f"/api/jobs/{theirs.id}/events", other_user)  # their own allowance
            other.close()

            streams.pop().close()  # the server notices at its next heartbeat and gives the slot back
            started = time.monotonic()
            streams.append(_open_stream(server, path, user))
            print(f"slot of a closed stream free again after {time.monotonic() - started:.2f} s")
            with pytest.raises(StreamRefused) as refused:
                SseReader(server, path, user)
            assert refused.value.status == 429

            workers = psutil.Process(master.pid).children()
            assert len(workers) == 2
            workers[0].kill()  # its streams end without releasing their slots
            killed_at = time.monotonic()
            survivors = [s for s in streams if _alive(s)]
            assert 1 <= len(survivors) <= 3, len(survivors)  # both processes held some of the user's streams
            reopened = [_open_stream(server, path, user, deadline_s=60) for _ in range(4 - len(survivors))]
            waited = time.monotonic() - killed_at
            print(f"{4 - len(survivors)} slots of the killed process free again after {waited:.2f} s (lease 4 s)")
            assert waited < 4 + 30
            streams = survivors + reopened
            with pytest.raises(StreamRefused) as refused:
                SseReader(server, path, user)
            assert refused.value.status == 429
        finally:
            for stream in streams:
                stream.close()
