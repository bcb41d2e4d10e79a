"""Shard leases: a running shard says, in PostgreSQL, who runs it and until when; its task keeps saying so.

Without a lease, a shard whose worker was killed looks exactly like a shard that is still running (``status =
'running'``), and only a broker and worker inquiry after a long grace period could tell them apart. With one:

* the claim (``shared.jobs.pipeline._claim_shard``) sets ``lease_holder`` (worker node and pool pid) and
  ``lease_expires_at = now() + lease`` in the same update that marks the shard running;
* while the shard's task runs, a :class:`Heartbeat` thread in the pool process renews the lease every ``renew_s``
  on a database connection of its own (never one the task needs), so a lease outlives any shard that is alive;
* when the task ends, whatever the outcome, the heartbeat stops; a killed worker's heartbeat dies with its pool
  process (PDEATHSIG), and its lease runs out within ``lease_s``;
* the reconciler (shared/jobs/reconciler.py) takes a running shard whose lease has expired as a candidate at once, and
  re-publishes it unless a live worker still holds its task.

The lease decides only who looks again, never whose results count: finishing stays the conditional open → done
update (shared/jobs/pipeline.py), so a holder whose lease lapsed (a database pause) but who finishes first still stores
its deterministic results once, and the other delivery changes nothing.

Every kind of shard gets its lease the same way: ``worker.tasks.run_shard_task`` wraps the service call in a
:class:`Heartbeat`, which also hands the claim its terms through a context variable (the services of each job kind
call ``jobs.start_shard`` themselves and need not know about leases). A claim made outside a heartbeat (a direct
service call) takes no lease: ``NULL``, judged by the reconciler's grace rule like a queued shard.
"""

from __future__ import annotations

import contextvars
import logging
import threading
from dataclasses import dataclass
from types import TracebackType

from sqlalchemy import Engine, text

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LeaseTerms:
    holder: str  # who claims: "<worker node name> pid <pool process id>"
    lease_s: float


_terms: contextvars.ContextVar[LeaseTerms | None] = contextvars.ContextVar("alphaforge_shard_lease", default=None)


def current_terms() -> LeaseTerms | None:
    """The lease a claim made now should take (None outside a :class:`Heartbeat`)."""
    return _terms.get()


_RENEW = text(
    """
    UPDATE job_shards SET lease_expires_at = now() + make_interval(secs => :lease_s)
    WHERE id = :id AND status = 'running' AND lease_holder = :holder
    """
)


def renew(engine: Engine, shard_id: int, terms: LeaseTerms) -> bool:
    """Extend the lease if this holder still has the shard running; False otherwise (not claimed yet, finished,
    re-published, or claimed again by another delivery: then that one renews)."""
    with engine.begin() as conn:
        result = conn.execute(_RENEW, {"id": shard_id, "lease_s": terms.lease_s, "holder": terms.holder})
    return bool(result.rowcount)


class Heartbeat:
    """``with Heartbeat(engine, shard_id, terms, renew_s):`` around a shard's service call.

    ``engine`` is the heartbeat's own (one connection per pool process): a renewal must never wait behind the
    task's own connections, nor take one from it. A failed renewal (database unreachable) is logged and tried
    again at the next beat; the lease has room for several misses (``renew_s`` is at most half the lease).
    """

    def __init__(self, engine: Engine, shard_id: int, terms: LeaseTerms, renew_s: float) -> None:
        self.engine = engine
        self.shard_id = shard_id
        self.terms = terms
        self.renew_s = renew_s
        self.renewals = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{shard_id}", daemon=True)
        self._token: contextvars.Token[LeaseTerms | None] | None = None

    def __enter__(self) -> Heartbeat:
        self._token = _terms.set(self.terms)
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        if self._token is not None:
            _terms.reset(self._token)
        # Not waiting for a renewal stuck on a frozen database: the thread is a daemon, and a renewal after the end
        # only touches a shard this holder still has running (a retry's wait), within one lease.
        self._thread.join(timeout=1.0)

    def _run(self) -> None:
        warned = False  # once per outage, not every beat
        while not self._stop.wait(self.renew_s):
            try:
                if renew(self.engine, self.shard_id, self.terms):
                    self.renewals += 1
                warned = False
            except Exception as exc:
                if not warned:
                    warned = True
                    log.warning("shard %s: lease not renewed (%s: %s); trying again every %.1f s", self.shard_id,
                                type(exc).__name__, exc, self.renew_s)  # fmt: skip
