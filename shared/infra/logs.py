"""Structured logging: one JSON object per line, with the request/task context on every line.

Entry points (the API's WSGI factory, the Celery worker and beat, the launcher) call :func:`configure_logging`
once; library code only ever uses ``logging.getLogger(__name__)``. Tests leave logging to pytest.
"""

from __future__ import annotations

import logging
import sys
from typing import IO

from pythonjsonlogger.json import JsonFormatter

from shared.infra import log_context

_FORMAT = "%(levelname)s %(name)s %(message)s"
_RENAME = {"levelname": "level", "name": "logger"}


class ContextFilter(logging.Filter):
    """Copies the current request/task context (request_id, user_id, task_id, ...) onto each record."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in log_context.current().items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


def json_formatter(service: str) -> JsonFormatter:
    return JsonFormatter(_FORMAT, rename_fields=_RENAME, static_fields={"service": service}, timestamp="time")


def configure_logging(service: str, level: str | int = "INFO", stream: IO[str] | None = None) -> None:
    """Route every logger through one JSON handler on the root logger (replacing any handler there)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(json_formatter(service))
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)
