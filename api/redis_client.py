"""The API's Redis connections: short timeouts, no retries, and a breaker that makes a dead Redis cost one timeout.

One request touches Redis several times (token revocation, rate limits, login throttling, the latency histogram,
events). Against a Redis that stopped answering, each touch would wait its own socket timeout (and redis-py 8
retries three times by default). Instead every API Redis connection comes from one pool per app whose connections
share a :class:`Breaker`: the first command that gets no answer opens it, and for ``ALPHAFORGE_REDIS_COOLDOWN``
seconds every further command fails at once with a ConnectionError (rate limits fail open, revocation fails closed
with a 503, metrics are skipped). After the cooldown the next command tries the server again.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from shared.infra.config import Settings


class Breaker:
    """Open for ``cooldown_s`` after a failure; thread-safe."""

    def __init__(self, cooldown_s: float) -> None:
        self.cooldown_s = cooldown_s
        self._open_until = 0.0
        self._lock = threading.Lock()

    def check(self) -> None:
        if time.monotonic() < self._open_until:
            raise redis.ConnectionError(
                f"Redis did not answer a moment ago; not asked again for {self.cooldown_s:g} s "
                "(ALPHAFORGE_REDIS_COOLDOWN)"
            )

    def trip(self) -> None:
        with self._lock:
            self._open_until = time.monotonic() + self.cooldown_s

    def reset(self) -> None:
        with self._lock:
            self._open_until = 0.0


class _BreakerConnection(redis.Connection):
    breaker: Breaker  # set on a subclass per pool

    def connect(self) -> None:
        self.breaker.check()
        try:
            super().connect()
        except (redis.ConnectionError, redis.TimeoutError, OSError):
            self.breaker.trip()
            raise

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        self.breaker.check()
        try:
            super().send_packed_command(command, check_health)
        except (redis.ConnectionError, redis.TimeoutError, OSError):
            self.breaker.trip()
            raise

    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().read_response(*args, **kwargs)
        except (redis.ConnectionError, redis.TimeoutError, OSError):
            self.breaker.trip()
            raise


def api_redis_pool(settings: Settings) -> redis.ConnectionPool:
    """The pool every API Redis client of one app shares (the app's client, the rate limiter's storage)."""
    t = settings.timeouts
    breaker = Breaker(t.redis_cooldown_s)
    connection_class = type("BreakerConnection", (_BreakerConnection,), {"breaker": breaker})
    return redis.ConnectionPool.from_url(
        settings.require_redis_url(),
        connection_class=connection_class,
        socket_connect_timeout=t.redis_connect_s,
        socket_timeout=t.redis_socket_s,
        health_check_interval=30,
        retry=Retry(NoBackoff(), 0),
    )
