"""Request ids and the access log.

Every request gets an id: the client's ``X-Request-ID`` when it is well-formed, else a new one. It is echoed
in the response, bound to the log context (so every log line of the request carries it), stored in audit
rows, and put into the headers of every Celery task the request publishes (see shared/contract.py), where
the worker binds it again. Each request ends with one structured access-log line.
"""

from __future__ import annotations

import logging
import time

from flask import Flask, Response, g, request

from shared.infra import log_context

access_log = logging.getLogger("alphaforge.access")


def current_request_id() -> str | None:
    value: str | None = g.get("request_id")
    return value


def init_request_ids(app: Flask) -> None:
    @app.before_request
    def _start() -> None:
        log_context.clear()  # a worker thread serves one request at a time: start from nothing
        g.request_id = log_context.accept_or_make_request_id(request.headers.get(log_context.REQUEST_ID_HEADER))
        g.request_started = time.perf_counter()
        log_context.bind(request_id=g.request_id)

    @app.after_request
    def _finish(response: Response) -> Response:
        request_id = g.get("request_id")
        if request_id:
            response.headers[log_context.REQUEST_ID_HEADER] = request_id
        started = g.get("request_started")
        access_log.info(
            "%s %s %s",
            request.method,
            request.path,
            response.status_code,
            extra={
                "method": request.method,
                "path": request.path,
                "status": response.status_code,
                "duration_ms": round(1000 * (time.perf_counter() - started), 1) if started else None,
                "client_address": request.remote_addr,
            },
        )
        return response

    @app.teardown_request
    def _teardown(exc: BaseException | None) -> None:
        log_context.clear()
