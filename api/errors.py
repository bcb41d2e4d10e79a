"""The one place where errors become HTTP responses: ``{"error": {"code", "message", "details"}}``."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import kombu.exceptions
import redis.exceptions
import sqlalchemy.exc
from flask import Flask, Response, jsonify
from pydantic import ValidationError
from werkzeug.exceptions import HTTPException

from shared.errors import AppError

log = logging.getLogger(__name__)


def error_response(status: int, code: str, message: str, details: dict[str, Any] | None = None) -> Response:
    response = jsonify({"error": {"code": code, "message": message, "details": details or {}}})
    response.status_code = status
    return response


def field_path(loc: Sequence[int | str]) -> str:
    """Pydantic location to a readable field path: ('stock_symbols', 3) -> 'stock_symbols[3]'."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path or "body"


def validation_error_response(exc: ValidationError, *, status: int = 422) -> Response:
    errors = []
    for err in exc.errors(include_url=False, include_input=False, include_context=False):
        message = str(err["msg"])
        if message.startswith("Value error, "):
            message = message[len("Value error, ") :]
        errors.append({"field": field_path(err["loc"]), "message": message, "type": err["type"]})
    summary = "; ".join(f"{e['field']}: {e['message']}" for e in errors[:3])
    if len(errors) > 3:
        summary += f" (and {len(errors) - 3} more)"
    return error_response(status, "validation_error", summary, {"errors": errors})


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(AppError)
    def _app_error(exc: AppError) -> Response:
        response = error_response(exc.status, exc.code, exc.message, exc.details)
        retry_after_s = getattr(exc, "retry_after_s", None)
        if retry_after_s is not None:
            response.headers["Retry-After"] = str(retry_after_s)
        return response

    @app.errorhandler(ValidationError)
    def _validation_error(exc: ValidationError) -> Response:
        return validation_error_response(exc)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response:
        if isinstance(exc.response, Response) and exc.response.mimetype == "application/json":
            return exc.response  # already in our shape (aborted with one of our responses)
        code = (exc.name or "error").lower().replace(" ", "_")
        return error_response(exc.code or 500, code, exc.description or exc.name or "error")

    @app.errorhandler(sqlalchemy.exc.OperationalError)
    @app.errorhandler(sqlalchemy.exc.InterfaceError)
    @app.errorhandler(redis.exceptions.ConnectionError)
    @app.errorhandler(redis.exceptions.TimeoutError)
    @app.errorhandler(kombu.exceptions.OperationalError)
    def _dependency_down(exc: Exception) -> Response:
        log.warning("dependency unavailable: %s: %s", type(exc).__name__, str(exc).splitlines()[:1])
        return error_response(503, "service_unavailable", "a backing service is unavailable; please retry")

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        log.exception("unhandled error")
        return error_response(500, "internal_error", "internal error; it has been logged")
