"""Job and run lifecycle events: ``GET /api/jobs/<job_id>/events`` and ``GET /api/runs/<run_id>/events``.

With ``Accept: text/event-stream``: server-sent events. Each event carries its stream id (``id:``), its type
(``event:``) and its data as JSON; a client that reconnects with ``Last-Event-ID`` (or ``?after_id=``) gets what
came after it. A comment line is sent every 15 s while nothing happens (proxies keep the connection, and a
gone client is noticed), and the stream ends after the terminal event (``finished``, ``failed``,
``cancelled``).

Otherwise: one JSON page of the events after ``after_id`` with an ``ETag``; ``If-None-Match`` with that tag
answers ``304`` while nothing new has happened (cheap polling).

The events come from the job's Redis stream (``shared.infra.events``), so any API process serves any job.

A stream holds one of the API process's threads for as long as the client follows: each process serves at most
``ALPHAFORGE_SSE_MAX_STREAMS`` streams at once (below its thread count, so logins, submissions and polls always
find a thread), and one user at most ``ALPHAFORGE_SSE_MAX_STREAMS_PER_USER`` across all API processes and hosts
(counted in Redis under leases, see ``api.stream_slots``). Above either limit the request is refused at once (503
or 429, with Retry-After) and the client can poll the JSON variant instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
import uuid
from collections.abc import Callable, Iterator
from http import HTTPStatus
from typing import Any

import redis
from flask import Response, current_app, jsonify, request
from flask_openapi3 import APIBlueprint, Tag
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session, sessionmaker

from api import BEARER_SECURITY, services
from api.auth import current_principal
from api.schemas import ErrorResponse
from api.stream_slots import ProcessSlots, UserSlot, UserSlots
from shared.accounts.access import require_read
from shared.errors import CapacityExhausted, NotFound, ValidationFailed
from shared.infra import events as job_events
from shared.infra.events import Event, RedisJobEvents
from shared.infra.models import Job
from shared.jobs import pipeline as jobs
from shared.jobs.backtests import read as runs

bp = APIBlueprint("events", __name__, url_prefix="/api", abp_tags=[Tag(name="events")], abp_security=BEARER_SECURITY)

HEARTBEAT_CONFIG_KEY = "ALPHAFORGE_SSE_HEARTBEAT_S"
RETRY_MS = 3000  # what an EventSource waits before reconnecting
_STREAM_CLIENT_KEY = "alphaforge_sse_redis"
_SLOTS_KEY = "alphaforge_sse_slots"
_client_lock = threading.Lock()


def _slots() -> tuple[ProcessSlots, UserSlots]:
    """This process's stream slots and the per-user ones in Redis; one pair per app, built on first use."""
    slots = current_app.extensions.get(_SLOTS_KEY)
    if slots is None:
        with _client_lock:
            slots = current_app.extensions.get(_SLOTS_KEY)
            if slots is None:
                svc = services()
                api = svc.settings.api
                slots = current_app.extensions[_SLOTS_KEY] = (
                    ProcessSlots(api.sse_max_streams),
                    UserSlots(svc.redis, api.sse_max_streams_per_user, api.sse_slot_lease_s),
                )
    return slots


def _take_slots(user_id: str) -> tuple[UserSlot, Callable[[], None]]:
    """The user's slot (429 at their limit, across processes), then one of this process's (503 when full).
    Returns the user's slot (the stream renews it) and the function that gives both back."""
    process_slots, user_slots = _slots()
    slot = user_slots.take(user_id)
    try:
        release_process_slot = process_slots.take()
    except CapacityExhausted:
        slot.release()
        raise

    def release() -> None:
        release_process_slot()
        slot.release()

    return slot, release


class JobEventsPath(BaseModel):
    job_id: str


class RunEventsPath(BaseModel):
    run_id: str


class EventsQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    after_id: str | None = Field(default=None, max_length=41, description="an event id: only the events after it")
    limit: int = Field(default=100, ge=1, le=1000)


class EventItem(BaseModel):
    id: str
    type: str
    data: dict[str, Any]


class EventsPage(BaseModel):
    job_id: str
    events: list[EventItem]
    last_id: str | None = Field(description="the id to pass as after_id next time")
    done: bool = Field(description="the terminal event is in this page: nothing will follow")


def _heartbeat_s() -> float:
    """``ALPHAFORGE_SSE_HEARTBEAT_S``; tests may set it per app in ``app.config``."""
    return float(current_app.config.get(HEARTBEAT_CONFIG_KEY, services().settings.api.sse_heartbeat_s))


def _stream_reader(heartbeat_s: float) -> RedisJobEvents:
    """A Redis client for blocking reads: its socket timeout must outlast one heartbeat's wait (the API's own
    client gives up after 2 s). One per app, built on first use."""
    client = current_app.extensions.get(_STREAM_CLIENT_KEY)
    if client is None:
        with _client_lock:
            client = current_app.extensions.get(_STREAM_CLIENT_KEY)
            if client is None:
                client = redis.Redis.from_url(
                    services().settings.require_redis_url(),
                    socket_connect_timeout=2,
                    socket_timeout=heartbeat_s + 10,
                    health_check_interval=30,
                )
                current_app.extensions[_STREAM_CLIENT_KEY] = client
    return RedisJobEvents(client)


def _job_not_found(raw: object) -> NotFound:
    return NotFound(f"job {str(raw)[:64]} not found", details={"job_id": str(raw)[:64]})


def _readable_job(session: Session, raw_id: str, *, run: bool) -> Job:
    try:
        job_id = uuid.UUID(raw_id)
    except ValueError:
        raise (runs_not_found(raw_id) if run else _job_not_found(raw_id)) from None
    if run:
        job, _ = runs.get_run(session, job_id)
        require_read(current_principal(), job.owner_id, runs_not_found(job_id))
    else:
        job = jobs.get_job(session, job_id)
        require_read(current_principal(), job.owner_id, _job_not_found(job_id))
    return job


def runs_not_found(raw: object) -> NotFound:
    return NotFound(f"run {str(raw)[:64]} not found", details={"run_id": str(raw)[:64]})


def _after_id(query: EventsQuery) -> str:
    header = request.headers.get("Last-Event-ID")
    if query.after_id is not None:
        if not job_events.is_event_id(query.after_id):
            raise ValidationFailed.for_field("after_id", "not an event id (use an id from this job's events)")
        return query.after_id
    if header:
        if not job_events.is_event_id(header.strip()):
            raise ValidationFailed.for_field("Last-Event-ID", "not an event id (use an id from this job's events)")
        return header.strip()
    return job_events.START_ID


HEAL_AFTER_S = 5
"""A job final for longer than this without a terminal event gets one from the reader (the writer had time)."""


def _final_status(factory: sessionmaker[Session], job_id: uuid.UUID) -> tuple[str, dict[str, Any]] | None:
    """The status and counters of a job that has been final for ``HEAL_AFTER_S`` seconds, else None."""
    columns = (Job.status, Job.shards_done, Job.shards_total, Job.symbols_done, Job.symbols_total)
    settled = Job.finished_at < func.now() - text(f"interval '{HEAL_AFTER_S} seconds'")
    with factory() as session:
        row = session.execute(select(*columns).where(Job.id == job_id, settled)).first()
    if row is None or row[0] not in runs.FINAL_STATUSES:
        return None
    status, shards_done, shards_total, symbols_done, symbols_total = row
    counters = {"shards_done": shards_done, "shards_total": shards_total, "symbols_done": symbols_done,
                "symbols_total": symbols_total}  # fmt: skip
    return status, counters


def _heal(reader: RedisJobEvents, factory: sessionmaker[Session], job_id: uuid.UUID) -> None:
    """A job the database says is final gets its terminal event, if no one wrote it (a lost publish, a shard
    failed by the reconciler): the stream must end."""
    final = _final_status(factory, job_id)
    if final is not None:
        with contextlib.suppress(redis.RedisError):  # the next heartbeat tries again
            reader.ensure_terminal(job_id, final[0], final[1])


def _sse(event: Event) -> str:
    return f"id: {event.id}\nevent: {event.type}\ndata: {json.dumps(event.data, separators=(',', ':'))}\n\n"


def _stream(
    reader: RedisJobEvents,
    factory: sessionmaker[Session],
    job_id: uuid.UUID,
    after: str,
    heartbeat_s: float,
    slot: UserSlot,
) -> Iterator[str]:
    yield f"retry: {RETRY_MS}\n\n"
    last = after
    while True:
        if slot.renew_due() and not _renewed(slot):
            return  # the lease lapsed and the user's other streams took the room: the client reconnects later
        batch = reader.read(job_id, last, count=100, block_ms=max(1, int(heartbeat_s * 1000)))
        for event in batch:
            yield _sse(event)
            last = event.id
            if event.terminal:
                return
        if not batch:
            yield ": heartbeat\n\n"
            _heal(reader, factory, job_id)


def _renewed(slot: UserSlot) -> bool:
    """Renew the stream's per-user lease; a Redis error keeps the stream going (its next read decides)."""
    try:
        return slot.renew()
    except redis.RedisError:
        return True


def _events(raw_id: str, query: EventsQuery, *, run: bool) -> Response:
    svc = services()
    with svc.session_factory() as session:
        job_id = _readable_job(session, raw_id, run=run).id
    after = _after_id(query)
    heartbeat_s = _heartbeat_s()
    reader = _stream_reader(heartbeat_s)
    _heal(reader, svc.session_factory, job_id)
    if request.accept_mimetypes.best_match(["application/json", "text/event-stream"]) == "text/event-stream":
        slot, release = _take_slots(current_principal().user_id)
        response = Response(_stream(reader, svc.session_factory, job_id, after, heartbeat_s, slot),
                            mimetype="text/event-stream")  # fmt: skip
        response.call_on_close(release)
        response.headers["Cache-Control"] = "no-cache"
        response.headers["X-Accel-Buffering"] = "no"  # nginx: pass each event on at once
        return response
    batch = reader.read(job_id, after, count=query.limit)
    done = any(e.terminal for e in batch)
    last_id = batch[-1].id if batch else (after if after != job_events.START_ID else None)
    etag = hashlib.sha256(f"{job_id}|{after}|{last_id}|{done}|{query.limit}".encode()).hexdigest()[:32]
    if request.if_none_match.contains(etag):
        not_modified = Response(status=304)
        not_modified.set_etag(etag)
        return not_modified
    page = EventsPage(
        job_id=str(job_id),
        events=[EventItem.model_validate(e.as_dict()) for e in batch],
        last_id=last_id,
        done=done,
    )
    response = jsonify(page.model_dump(mode="json"))
    response.set_etag(etag)
    response.headers["Cache-Control"] = "no-cache"
    return response


_RESPONSES: dict[str | int | HTTPStatus, type[BaseModel] | dict[Any, Any] | None] = {
    200: EventsPage,
    304: None,
    401: ErrorResponse,
    404: ErrorResponse,
    422: ErrorResponse,
    429: ErrorResponse,
    503: ErrorResponse,
}


@bp.get("/jobs/<job_id>/events", responses=_RESPONSES)
def job_events_view(path: JobEventsPath, query: EventsQuery) -> Response:
    """A job's lifecycle events: server-sent events with ``Accept: text/event-stream`` (resume with
    ``Last-Event-ID``), else a JSON page after ``after_id`` with an ETag (``If-None-Match``: 304)."""
    return _events(path.job_id, query, run=False)


@bp.get("/runs/<run_id>/events", responses=_RESPONSES)
def run_events_view(path: RunEventsPath, query: EventsQuery) -> Response:
    """A run's lifecycle events (the run is a job: the same events as ``/api/jobs/<run_id>/events``)."""
    return _events(path.run_id, query, run=True)
