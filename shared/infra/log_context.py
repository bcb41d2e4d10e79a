"""Per-request / per-task fields that every log line carries (request id, user, Celery task, ...).

A ``ContextVar`` holds them, so they follow the code that handles one request or one task and nothing else:
the API binds them when a request starts, the worker when a task starts (from the request id the API put in
the task's headers), and :class:`shared.infra.logs.ContextFilter` copies them onto each log record.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar, Token
from types import MappingProxyType
from typing import Any

_EMPTY: MappingProxyType[str, Any] = MappingProxyType({})
_context: ContextVar[MappingProxyType[str, Any]] = ContextVar("alphaforge_log_context", default=_EMPTY)

# What a client may send as X-Request-ID: 8 to 128 characters that are safe in headers, logs and JSON.
REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{7,127}")
REQUEST_ID_HEADER = "X-Request-ID"
TASK_HEADER_REQUEST_ID = "alphaforge_request_id"  # Celery message header carrying the request id


def accept_or_make_request_id(raw: str | None) -> str:
    """The client's id when well-formed (so its traces join ours), else a fresh one."""
    if raw and REQUEST_ID_PATTERN.fullmatch(raw):
        return raw
    return uuid.uuid4().hex


def bind(**fields: Any) -> Token[MappingProxyType[str, Any]]:
    """Add fields (None values are dropped) to the current context; ``reset`` with the token undoes it."""
    merged = dict(_context.get())
    merged.update({k: v for k, v in fields.items() if v is not None})
    return _context.set(MappingProxyType(merged))


def reset(token: Token[MappingProxyType[str, Any]]) -> None:
    _context.reset(token)


def clear() -> None:
    _context.set(_EMPTY)


@contextmanager
def bound(**fields: Any) -> Iterator[None]:
    token = bind(**fields)
    try:
        yield
    finally:
        reset(token)


def current() -> MappingProxyType[str, Any]:
    return _context.get()


def current_request_id() -> str | None:
    value = _context.get().get("request_id")
    return str(value) if value is not None else None
