"""Job lifecycle events in a Redis stream per job: what ``/api/jobs/<id>/events`` serves.

The job service (``shared.jobs.pipeline``) publishes after each change has committed: ``queued``, ``shard_started``,
``shard_finished`` (with the job's counters), then one terminal event, ``finished`` (succeeded or partial),
``failed`` or ``cancelled``. The stream lives in Redis, not in a process, so any API process can serve any job's
events, and a stream entry's id (``<ms>-<seq>``, assigned by Redis, increasing) is a stable event id to resume
from (``Last-Event-ID``).

The terminal event is the last one on a job's stream, always: every event is appended by one Lua script
(``_APPEND``) that Redis runs atomically, which appends only while the stream is open and, for a terminal event,
closes it (a ``:terminal`` marker key) in the same step. Whatever is published after that (a shard still running
when its job was cancelled, a shard whose ``shard_finished`` raced the last shard's ``finished`` on another host)
is dropped: the stream has ended for its readers, who stop at the terminal event, and the job's final counters
are in PostgreSQL. A terminal event is therefore written at most once per job, whoever writes it.

Publishing is best effort: PostgreSQL is the record of a job, and an event that could not be written must not
fail the shard that did the work. A reader that finds the job final in the database without a terminal event
in the stream writes it then (``ensure_terminal``).

Expiry: every append renews the stream's TTL, and the terminal append gives the stream and its marker the same
TTL, so both go together a week after the terminal event (nothing renews a closed stream). Trimming
(``MAXLEN ~``) drops the oldest entries only, never the newest, so it cannot remove the terminal event.
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


_APPEND = """
-- KEYS[1] the job's stream, KEYS[2] its terminal marker; ARGV: type, data, terminal (1/0), maxlen, ttl
if redis.call('EXISTS', KEYS[2]) == 1 then
    return false
end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[4], '*', 'type', ARGV[1], 'data', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[5])
if ARGV[3] == '1' then
    redis.call('SET', KEYS[2], ARGV[1], 'EX', ARGV[5])
end
return id
"""


class RedisJobEvents:
    """Publishes to and reads from the per-job streams."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._append = client.register_script(_APPEND)

    def publish(self, job_id: uuid.UUID, kind: str, data: dict[str, Any]) -> None:
        try:
            self._publish(job_id, kind, data)
        except redis.RedisError as exc:
            log.warning("event %s of job %s not published: %s: %s", kind, job_id, type(exc).__name__, exc)

    def _publish(self, job_id: uuid.UUID | str, kind: str, data: dict[str, Any]) -> str | None:
        """The new event's id, or None when the stream is closed (its terminal event is written) and the
        event was dropped."""
        terminal = "1" if kind in TERMINAL else "0"
        event_id = self._append(
            keys=[stream_key(job_id), _terminal_key(job_id)],
            args=[kind, json.dumps(data), terminal, STREAM_MAXLEN, STREAM_TTL_S],
        )
        if event_id is None:
            log.debug("event %s of job %s dropped: the stream has its terminal event", kind, job_id)
            return None
        return _text(event_id)

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
