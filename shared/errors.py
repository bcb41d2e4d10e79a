"""One error hierarchy for the whole product.

Domain and service code raise these; ``api/errors.py`` maps every one of them (and every other
exception) to the single JSON error shape ``{"error": {"code", "message", "details"}}``.
"""

from __future__ import annotations

from typing import Any


class ConfigError(RuntimeError):
    """The environment does not describe a runnable configuration."""


class StartupError(RuntimeError):
    """``alphaforge up`` cannot start for a reason the user can fix; reported without a traceback."""


class AppError(Exception):
    """An error a client may see: an HTTP status, a stable code, a message and structured details."""

    status: int = 500
    code: str = "internal_error"

    def __init__(self, message: str, *, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details: dict[str, Any] = details or {}


class BadRequest(AppError):
    status = 400
    code = "bad_request"


class InvalidJson(BadRequest):
    code = "invalid_json"


class UnsupportedMediaType(AppError):
    status = 415
    code = "unsupported_media_type"


class ValidationFailed(AppError):
    """Input that parsed but is not acceptable. ``details["errors"]`` lists ``{field, message}``."""

    status = 422
    code = "validation_error"

    @classmethod
    def for_field(cls, field: str, message: str) -> ValidationFailed:
        return cls(f"{field}: {message}", details={"errors": [{"field": field, "message": message}]})


class ScriptCompileError(ValidationFailed):
    """The user's script does not compile under the sandbox policy."""

    code = "script_compile_error"

    def __init__(self, message: str, *, line: int | None, field: str = "script") -> None:
        where = f"line {line}: " if line is not None else ""
        super().__init__(
            f"{field}: {where}{message}",
            details={"errors": [{"field": field, "message": message, "line": line}]},
        )
        self.line = line
        self.reason = message


class NotFound(AppError):
    status = 404
    code = "not_found"


class Conflict(AppError):
    status = 409
    code = "conflict"


class ServiceUnavailable(AppError):
    status = 503
    code = "service_unavailable"


class CapacityExhausted(ServiceUnavailable):
    """The server is at a configured capacity (e.g. open event streams); ``retry_after_s`` becomes Retry-After."""

    code = "capacity_exhausted"

    def __init__(self, message: str, *, retry_after_s: int, details: dict[str, Any] | None = None) -> None:
        super().__init__(message, details=details)
        self.retry_after_s = max(1, retry_after_s)


class Unauthorized(AppError):
    """No credentials, or credentials that are malformed, expired, revoked or wrong."""

    status = 401
    code = "unauthorized"


class Forbidden(AppError):
    """Authenticated, but this account may not do this (only used where existence is no secret to the caller)."""

    status = 403
    code = "forbidden"


class TooManyRequests(AppError):
    """A rate limit or quota was reached; ``retry_after_s`` becomes the Retry-After header."""

    status = 429
    code = "rate_limited"

    def __init__(self, message: str, *, retry_after_s: int, details: dict[str, Any] | None = None) -> None:
        super().__init__(message, details=details)
        self.retry_after_s = max(1, retry_after_s)


class QuotaExceeded(TooManyRequests):
    code = "quota_exceeded"
