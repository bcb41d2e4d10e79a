"""Engine and session factory, with every wait on PostgreSQL bounded. Nothing connects at import time: callers
build and pass these.

Bounds (:class:`Bounds`, from :class:`shared.infra.config.Timeouts`): the connect timeout, the server-side
``statement_timeout``, ``lock_timeout`` and ``idle_in_transaction_session_timeout`` of every session, and the pool's
checkout timeout. A server that is *frozen* (SIGSTOP, a hung VM) still ACKs TCP, so none of those ends a wait for its
answer; :func:`install_deadlines` adds a client-side deadline per wait (psycopg2's wait callback): a statement gets
its statement timeout plus :data:`DEADLINE_MARGIN_S`, a pool's liveness ping ``ping_s``, a connect ``connect_s``.
Past it the socket is shut down and ``OperationalError`` ("could not receive data from server") is raised, which
SQLAlchemy treats as a disconnect (the connection is dropped) and the API answers 503.

The wait callback is process-wide and makes psycopg2 refuse COPY, so only the API's and the workers' processes
install it (``api.create_wsgi_app``, ``worker.tasks``); the workers' bar reads COPY through :func:`copy_out`, which
bounds the COPY with a watchdog instead.
"""

from __future__ import annotations

import contextlib
import contextvars
import io
import os
import select
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg2
import psycopg2.extensions
from sqlalchemy import Engine, create_engine
from sqlalchemy.orm import Session, sessionmaker

from shared.infra.config import Timeouts

DEADLINE_MARGIN_S = 0.5  # the client waits this much longer than the server's own statement_timeout


@dataclass(frozen=True)
class Bounds:
    connect_s: float
    ping_s: float
    statement_s: float
    lock_s: float
    idle_in_transaction_s: float
    pool_checkout_s: float

    @classmethod
    def for_api(cls, t: Timeouts) -> Bounds:
        """An API request: seconds, so that a dead or frozen database is a 503 within ~5 s."""
        return cls(t.db_connect_s, t.db_ping_s, t.db_statement_s, t.db_lock_s, t.db_idle_in_transaction_s,
                   t.db_pool_checkout_s)  # fmt: skip

    @classmethod
    def for_workers(cls, t: Timeouts) -> Bounds:
        """Workers, beat and the CLI: long statements are their job; lock waits are bounded by the statement."""
        return cls(max(t.db_connect_s, 5.0), max(t.db_ping_s, 5.0), t.db_worker_statement_s, t.db_worker_statement_s,
                   max(t.db_idle_in_transaction_s, t.db_worker_statement_s), 30.0)  # fmt: skip


def normalize_database_url(url: str) -> str:
    """Use the psycopg2 driver for plain ``postgresql://`` / ``postgres://`` URLs."""
    if url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://") :]
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg2://" + url[len("postgresql://") :]
    return url


class _BoundedConnection(psycopg2.extensions.connection):
    """A psycopg2 connection that knows its deadlines (class attributes of a subclass per engine)."""

    connect_s: float = 0.0
    statement_s: float = 0.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.ready = False  # connecting: the connect deadline applies
        super().__init__(*args, **kwargs)
        self.ready = True


_wait_override: contextvars.ContextVar[float | None] = contextvars.ContextVar("alphaforge_db_wait", default=None)


def _wait_with_deadline(conn: Any) -> None:
    """psycopg2's wait callback: poll until done, at most the connection's deadline for this wait."""
    limit = _wait_override.get()
    if limit is None and isinstance(conn, _BoundedConnection):
        limit = conn.statement_s + DEADLINE_MARGIN_S if conn.ready else conn.connect_s
    deadline = None if limit is None else time.monotonic() + limit
    while True:
        state = conn.poll()
        if state == psycopg2.extensions.POLL_OK:
            return
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            # conn.close() would block on the connection's own lock here; shutting the socket down ends every wait
            # on it, and SQLAlchemy closes the connection as a disconnect.
            _shut_down(conn)
            raise psycopg2.OperationalError(f"could not receive data from server: no answer within {limit:g} s")
        if state == psycopg2.extensions.POLL_READ:
            select.select([conn.fileno()], [], [], remaining)
        elif state == psycopg2.extensions.POLL_WRITE:
            select.select([], [conn.fileno()], [], remaining)
        else:  # pragma: no cover - psycopg2 documents no other state
            raise psycopg2.OperationalError(f"unexpected poll state {state}")


def install_deadlines() -> None:
    """Bound every wait of this process's PostgreSQL connections (see the module docstring). Idempotent."""
    psycopg2.extensions.set_wait_callback(_wait_with_deadline)


_copy_lock = threading.Lock()


def copy_out(cursor: Any, sql: str) -> io.BytesIO:
    """``COPY (...) TO STDOUT`` into memory, bounded like any statement of the cursor's connection.

    psycopg2 refuses COPY under a wait callback. Where one is installed, it is taken out for this one COPY (one COPY
    at a time per process) and a watchdog shuts the socket down at the statement's deadline instead, as the callback
    would have. Only the workers use it: while it runs, another thread's new statement would wait without the
    callback's deadline (the server's own timeouts still apply), which a worker's lease heartbeat can afford (a
    missed renewal is a retry elsewhere) and an API request thread should not.
    """
    out = io.BytesIO()
    _copy_expert(cursor, sql, out)
    return out


def copy_in(cursor: Any, sql: str, data: bytes) -> None:
    """``COPY ... FROM STDIN`` of ``data``, bounded as :func:`copy_out` is (the same swap of the wait callback)."""
    _copy_expert(cursor, sql, io.BytesIO(data))


def _copy_expert(cursor: Any, sql: str, stream: io.BytesIO) -> None:
    conn = cursor.connection
    callback = psycopg2.extensions.get_wait_callback()
    if callback is None:
        cursor.copy_expert(sql, stream)
        return
    limit = conn.statement_s + DEADLINE_MARGIN_S if isinstance(conn, _BoundedConnection) else None
    with _copy_lock:
        psycopg2.extensions.set_wait_callback(None)
        watchdog = threading.Timer(limit, _shut_down, (conn,)) if limit else None
        if watchdog is not None:
            watchdog.daemon = True
            watchdog.start()
        try:
            cursor.copy_expert(sql, stream)
        finally:
            if watchdog is not None:
                watchdog.cancel()
            psycopg2.extensions.set_wait_callback(callback)


def _shut_down(conn: Any) -> None:
    with contextlib.suppress(OSError):
        socket.socket(fileno=os.dup(conn.fileno())).shutdown(socket.SHUT_RDWR)


def _options(bounds: Bounds) -> str:
    ms = {
        "statement_timeout": bounds.statement_s,
        "lock_timeout": bounds.lock_s,
        "idle_in_transaction_session_timeout": bounds.idle_in_transaction_s,
    }
    return " ".join(f"-c {name}={round(seconds * 1000)}" for name, seconds in ms.items())


def make_engine(url: str, *, pool_size: int = 5, bounds: Bounds | None = None) -> Engine:
    """An engine whose every wait is bounded (``bounds``; default: the workers' bounds of the default Timeouts)."""
    bounds = bounds or Bounds.for_workers(Timeouts())
    factory = type("BoundedConnection", (_BoundedConnection,), {"connect_s": bounds.connect_s,
                                                                 "statement_s": bounds.statement_s})  # fmt: skip
    engine = create_engine(
        normalize_database_url(url),
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_timeout=bounds.pool_checkout_s,
        pool_pre_ping=True,
        pool_recycle=1800,
        connect_args={
            "connect_timeout": max(1, round(bounds.connect_s)),  # libpq's own, whole seconds (without the callback)
            "application_name": "alphaforge",
            "options": _options(bounds),
            "connection_factory": factory,
            "keepalives": 1,
            "keepalives_idle": 30,
            "keepalives_interval": 10,
            "keepalives_count": 3,
        },
    )
    ping = engine.dialect.do_ping

    def do_ping(dbapi_connection: Any) -> bool:
        token = _wait_override.set(bounds.ping_s)
        try:
            return bool(ping(dbapi_connection))
        finally:
            _wait_override.reset(token)

    engine.dialect.do_ping = do_ping  # type: ignore[method-assign]
    return engine


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(bind=engine, expire_on_commit=False)


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session that commits on success and rolls back on any error."""
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
