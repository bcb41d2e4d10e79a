"""Job lifecycle events in a Redis stream per job: what ``/api/jobs/<id>/events`` serves.

The job service (``shared.jobs``) publishes after each change has committed: ``queued``, ``shard_started``,
``shard_finished`` (with the job's counters), then one terminal event, ``finished`` (succeeded or partial),
``failed`` or ``cancelled``. The stream lives in Redis, not in a process, so any API process can serve any job's
events, and a stream entry's id (``<ms>-<seq>``, assigned by Redis, increasing) is a stable event id to resume
from (``Last-Event-ID``).

Publishing is best effort: PostgreSQL is the record of a job, and an event that could not be written must not
fail the shard that did the work. A reader that finds the job final in the database without a terminal event
in the stream writes it then (``ensure_terminal``); a terminal event is written at most once per job (a
``SET NX`` guard), whoever writes it.
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass
from typing import Any, Protocol

import redis

log = logging.getLogger(__name__)

QUEUED = "queued"
SHARD_STARTED = "shard_started"
SHARD_FINISHED = "shard_finished"
FINISHED = "finished"
FAILED = "failed"
CANCELLED = "cancelled"
TERMINAL = frozenset({FINISHED, FAILED, CANCELLED})

STREAM_TTL_S = 7 * 24 * 3600  # a job's stream expires a week after its last event
STREAM_MAXLEN = 100_000  # approximate cap per job (two events per shard: 50,000 shards)
START_ID = "0-0"


class JobEvents(Protocol):
    """Where the job service reports lifecycle changes (``RedisJobEvents``; tests may pass their own)."""

    def publish(self, job_id: uuid.UUID, kind: str, data: dict[str, Any]) -> None: ...


def terminal_kind(status: str) -> str:
    """The terminal event of a final job status."""
    return {"failed": FAILED, "cancelled": CANCELLED}.get(status, FINISHED)


@dataclass(frozen=True)
class Event:
    id: str
    type: str
    data: dict[str, Any]

    @property
    def terminal(self) -> bool:
        return self.type in TERMINAL

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "type": self.type, "data": self.data}


def stream_key(job_id: uuid.UUID | str) -> str:
    return f"alphaforge:events:job:{job_id}"


def _terminal_key(job_id: uuid.UUID | str) -> str:
    return f"{stream_key(job_id)}:terminal"


def is_event_id(value: str) -> bool:
    """A Redis stream id ``<ms>-<seq>`` (what ``Last-Event-ID`` and ``after_id`` must hold)."""
    ms, sep, seq = value.partition("-")
    return bool(sep) and ms.isdigit() and seq.isdigit() and len(value) <= 41


class RedisJobEvents:
    """Publishes to and reads from the per-job streams."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    def publish(self, job_id: uuid.UUID, kind: str, data: dict[str, Any]) -> None:
        try:
            self._publish(job_id, kind, data)
        except redis.RedisError as exc:
            log.warning("event %s of job %s not published: %s: %s", kind, job_id, type(exc).__name__, exc)

    def _publish(self, job_id: uuid.UUID | str, kind: str, data: dict[str, Any]) -> str | None:
        if kind in TERMINAL and not self.client.set(_terminal_key(job_id), kind, nx=True, ex=STREAM_TTL_S):
            return None  # this job's terminal event is already written
        pipe = self.client.pipeline()
        pipe.xadd(stream_key(job_id), {"type": kind, "data": json.dumps(data)}, maxlen=STREAM_MAXLEN, approximate=True)
        pipe.expire(stream_key(job_id), STREAM_TTL_S)
        event_id = pipe.execute()[0]
        return event_id.decode() if isinstance(event_id, bytes) else str(event_id)

    def ensure_terminal(self, job_id: uuid.UUID | str, status: str, data: dict[str, Any]) -> None:
        """Write the terminal event of a job the database says is final, unless one was written already."""
        self._publish(job_id, terminal_kind(status), {**data, "status": status, "recovered": True})

    def read(
        self, job_id: uuid.UUID | str, after_id: str, *, count: int = 100, block_ms: int | None = None
    ) -> list[Event]:
        """Events strictly after ``after_id``, oldest first; with ``block_ms``, wait that long for the first one."""
        entries: Any
        if block_ms is None:
            start = f"({after_id}" if after_id != START_ID else "-"
            entries = self.client.xrange(stream_key(job_id), min=start, max="+", count=count)
        else:
            reply: Any = self.client.xread({stream_key(job_id): after_id}, count=count, block=block_ms)
            entries = reply[0][1] if reply else []
        return [_event(entry_id, fields) for entry_id, fields in entries]

    def last_id(self, job_id: uuid.UUID | str) -> str | None:
        entries: Any = self.client.xrevrange(stream_key(job_id), count=1)
        return _text(entries[0][0]) if entries else None


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _event(entry_id: bytes | str, fields: dict[Any, Any]) -> Event:
    decoded = {_text(k): _text(v) for k, v in fields.items()}
    return Event(id=_text(entry_id), type=decoded.get("type", "unknown"), data=json.loads(decoded.get("data", "{}")))
