"""Celery beat's scheduler: celery-redbeat, made to ride out a Redis outage instead of dying.

celery-redbeat 2.4.2 renews its lock (``lock.extend``) and reads the schedule (a pipeline) at every tick with
the plain Redis client: a ``ConnectionError`` there propagates out of ``tick`` and Celery's beat service exits
(and then ``close`` raises again while releasing the lock). Its ``retry_period`` option does not help: it wraps
only the client's direct methods, not the lock or the pipeline. So beat died whenever Redis restarted, even for
a second. Here a tick that cannot reach Redis is skipped (logged, tried again shortly); a lock that expired or
vanished meanwhile is taken again when it is free, and while another beat holds it this one fires nothing
(redbeat's own rule: one beat fires at a time).
"""

from __future__ import annotations

import logging
from typing import Any

from redbeat.schedulers import LUA_EXTEND_TO_SCRIPT, RedBeatScheduler, get_redis  # type: ignore[import-untyped]
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import LockError
from redis.exceptions import TimeoutError as RedisTimeoutError

log = logging.getLogger(__name__)

REDIS_RETRY_S = 1.0  # while Redis does not answer, beat tries again this often
_REDIS_DOWN = (RedisConnectionError, RedisTimeoutError, OSError)


class TolerantRedBeatScheduler(RedBeatScheduler):
    """RedBeat whose tick survives Redis going away and coming back (same pid, lock re-taken, schedule kept)."""

    _redis_down = False

    def tick(self, *args: Any, **kwargs: Any) -> float:
        try:
            if self.lock_key and not self._hold_lock():
                return float(self.max_interval)  # another beat fires; stand by and try for the lock again
            interval = float(super().tick(*args, **kwargs))
        except _REDIS_DOWN as exc:
            if not self._redis_down:
                log.warning("beat: Redis unavailable (%s); retrying every %.0f s", exc, REDIS_RETRY_S)
            self._redis_down = True
            return REDIS_RETRY_S
        except LockError as exc:  # the lock expired while Redis was away, or was taken over
            log.warning("beat: lost the schedule lock (%s); taking it again when it is free", exc)
            self.lock = None
            return REDIS_RETRY_S
        if self._redis_down:
            log.warning("beat: Redis is back")
            self._redis_down = False
        return interval

    def _hold_lock(self) -> bool:
        """True when this beat holds the lock (taken now if it was lost, or never taken because Redis was down
        at startup: redbeat's startup hook swallows that error and leaves ``lock`` unset)."""
        if self.lock is not None:
            return True
        client = get_redis(self.app)
        lock = client.lock(self.lock_key, timeout=self.lock_timeout, sleep=self.max_interval)
        lock.lua_extend = client.register_script(LUA_EXTEND_TO_SCRIPT)  # redbeat's extend-to, as at startup
        if not lock.acquire(blocking=False):
            return False
        log.info("beat: acquired the schedule lock")
        self.lock = lock
        return True

    def close(self) -> None:
        """Shut down even when Redis is gone (the lock then simply expires)."""
        if self.lock is not None:
            try:
                if self.lock.owned():
                    self.lock.release()
            except (*_REDIS_DOWN, LockError) as exc:
                log.warning("beat: could not release the schedule lock (%s); it expires by itself", exc)
            self.lock = None
        super().close()
