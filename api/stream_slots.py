"""Slots for server-sent event streams: at most ``ALPHAFORGE_SSE_MAX_STREAMS`` open in one API process, at most
``ALPHAFORGE_SSE_MAX_STREAMS_PER_USER`` open for one user across every API process and host.

The per-process total protects that process's threads, so it is counted in the process (a lock and an integer).
The per-user limit must hold however the load balancer spreads one user's streams, so it is counted in Redis: a
sorted set per user whose members are the open streams and whose scores are their lease expiries (Redis's own
clock, so hosts with skewed clocks agree). A stream renews its lease as it goes (each heartbeat or batch of
events, see ``api.events``); a stream whose process was killed stops renewing and its member is pruned, by the
same Lua script that takes a slot, once its lease (``ALPHAFORGE_SSE_SLOT_LEASE_S``) has run out.

When Redis cannot be reached, a new stream is refused with a 503 (fail closed): the stream reads its events from
Redis and could not serve anything anyway, and failing open would let one user hold any number of threads while
the counter is away. The client retries after Retry-After or polls the JSON variant.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable

import redis

from shared.errors import CapacityExhausted, ServiceUnavailable, TooManyRequests

log = logging.getLogger(__name__)

STREAM_RETRY_AFTER_S = 5
_USER_KEY = "alphaforge:sse:user:{}"

# KEYS[1]: the user's set; ARGV: stream id, limit, lease (ms). Returns the streams open (this one included) when
# the slot was taken or renewed, or the negated count when the user is at the limit and this stream holds no slot.
_TAKE = """
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_ms)
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then
    local open = redis.call('ZCARD', KEYS[1])
    if open >= tonumber(ARGV[2]) then
        return -open
    end
end
redis.call('ZADD', KEYS[1], now_ms + tonumber(ARGV[3]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return redis.call('ZCARD', KEYS[1])
"""


class ProcessSlots:
    """The event streams open in this process: a stream takes one before it starts and gives it back when the
    server closes the response."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._open = 0

    def take(self) -> Callable[[], None]:
        """A slot, or CapacityExhausted (503). Returns the release function; calling it twice is harmless."""
        with self._lock:
            if self._open >= self.limit:
                raise CapacityExhausted(
                    "this API server follows as many event streams as it may; retry shortly, or poll the JSON "
                    "events (after_id, ETag) instead",
                    retry_after_s=STREAM_RETRY_AFTER_S,
                    details={"limit": self.limit},
                )
            self._open += 1
        released = False

        def release() -> None:
            nonlocal released
            with self._lock:
                if not released:
                    released = True
                    self._open -= 1

        return release


class UserSlots:
    """The event streams one user holds across every API process, counted in Redis under leases."""

    def __init__(self, client: redis.Redis, per_user: int, lease_s: float) -> None:
        self.client = client
        self.per_user = per_user
        self.lease_ms = max(1, int(lease_s * 1000))
        self._take = client.register_script(_TAKE)

    def take(self, user_id: str) -> UserSlot:
        """A slot for one stream of ``user_id``; TooManyRequests (429) at the limit, ServiceUnavailable (503)
        when Redis cannot be reached."""
        slot = UserSlot(self, _USER_KEY.format(user_id), uuid.uuid4().hex)
        try:
            taken = slot.renew()
        except redis.RedisError as exc:
            log.warning("event stream refused: its per-user slot could not be counted: %s: %s",
                        type(exc).__name__, exc)  # fmt: skip
            raise ServiceUnavailable(
                "event streams are unavailable (the stream store cannot be reached); retry shortly, or poll the "
                "JSON events (after_id, ETag) instead"
            ) from exc
        if not taken:
            raise TooManyRequests(
                f"you already follow {self.per_user} event streams; close one, or poll the JSON events "
                "(after_id, ETag) instead",
                retry_after_s=STREAM_RETRY_AFTER_S,
                details={"limit": self.per_user},
            )
        return slot


class UserSlot:
    """One stream's slot: renewed while the stream runs, released when it ends."""

    def __init__(self, slots: UserSlots, key: str, member: str) -> None:
        self.slots, self.key, self.member = slots, key, member
        self.renewed_at = 0.0

    def renew(self) -> bool:
        """Extend the lease (or take the slot again if it lapsed while there was room): False when the user is
        at the limit without this stream, which must then end."""
        open_streams = int(self.slots._take(keys=[self.key], args=[self.member, self.slots.per_user,
                                                                   self.slots.lease_ms]))  # fmt: skip
        self.renewed_at = time.monotonic()
        return open_streams > 0

    def renew_due(self) -> bool:
        """A third of the lease has passed since the last renewal (renewing on every loop turn would cost a
        round trip per batch of events)."""
        return time.monotonic() - self.renewed_at >= self.slots.lease_ms / 3000

    def release(self) -> None:
        try:
            self.slots.client.zrem(self.key, self.member)
        except redis.RedisError as exc:  # the lease runs out by itself
            log.warning("event stream slot not released (its lease will expire): %s: %s", type(exc).__name__, exc)
