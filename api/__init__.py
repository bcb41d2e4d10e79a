"""Flask application factory. Nothing connects at import time: ``create_app`` builds every client."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import redis
from celery import Celery
from flask import Response, current_app, redirect, request
from flask_openapi3 import Info, OpenAPI
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from api.auth import init_auth
from api.errors import register_error_handlers, validation_error_response
from api.ratelimit import apply_rate_limits, init_rate_limits
from api.redis_client import api_redis_pool
from api.request_ids import init_request_ids
from shared.contract import create_celery
from shared.errors import InvalidJson, UnsupportedMediaType, ValidationFailed
from shared.infra.artifact_store import ArtifactStore
from shared.infra.config import Settings
from shared.infra.db import Bounds, install_deadlines, make_engine, make_session_factory
from shared.infra.logs import configure_logging
from shared.marketdata import providers

API_VERSION = "0.1.0"


@dataclass(frozen=True)
class ApiServices:
    """Everything a request handler needs, built once per app and passed explicitly."""

    settings: Settings
    engine: Engine
    session_factory: sessionmaker[Session]
    celery: Celery
    redis: redis.Redis
    artifacts: ArtifactStore


def services() -> ApiServices:
    svc: ApiServices = current_app.extensions["alphaforge"]
    return svc


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _require_json_body() -> None:
    """Malformed, non-JSON or non-object bodies get a clear 4xx before any handler sees them."""
    if request.method not in ("POST", "PUT", "PATCH") or not request.content_length:
        return
    if not request.is_json:
        raise UnsupportedMediaType("send the body as JSON with Content-Type: application/json")
    try:
        body = json.loads(request.get_data(), parse_constant=_reject_constant)
    except RecursionError:
        raise InvalidJson("request body is not valid JSON: nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, bad UTF-8, NaN/Infinity, integers with thousands of digits
        raise InvalidJson(f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ValidationFailed.for_field("body", f"must be a JSON object, not {type(body).__name__}")
    _check_storable_text(body, "")


def _check_storable_text(value: Any, path: str) -> None:
    """PostgreSQL text cannot hold NUL or lone surrogates (valid JSON escapes both): refuse them by field."""
    if isinstance(value, dict):
        for key, item in value.items():
            field = f"{path}.{key}" if path else str(key)
            _check_storable_text(key, field)
            _check_storable_text(item, field)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_storable_text(item, f"{path}[{index}]")
    elif isinstance(value, str):
        if "\x00" in value:
            raise ValidationFailed.for_field(path, "must not contain NUL characters")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValidationFailed.for_field(path, "must be valid Unicode (no lone surrogates)") from None


BEARER_SECURITY: list[dict[str, list[str]]] = [{"bearer": []}]
"""OpenAPI security requirement of every endpoint but the public ones (see api/auth.py)."""


def create_wsgi_app() -> OpenAPI:
    """The production entry point (``gunicorn 'api:create_wsgi_app()'``): JSON logs, then the app."""
    settings = Settings.from_env()
    configure_logging("api", settings.log_level)
    install_deadlines()  # a frozen database is a 503, not a hung thread (shared/infra/db.py)
    return create_app(settings)


def create_app(settings: Settings | None = None) -> OpenAPI:
    settings = settings or Settings.from_env()
    settings.require_jwt_secret()  # fail at startup, not at the first login
    app = OpenAPI(
        __name__,
        info=Info(title="AlphaForge API", version=API_VERSION),
        doc_prefix="/api",
        doc_url="/openapi.json",
        validation_error_status=422,
        validation_error_callback=validation_error_response,
        security_schemes={"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT or afk_ API key"}},
    )
    if settings.proxy_hops:
        from werkzeug.middleware.proxy_fix import ProxyFix

        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=settings.proxy_hops)  # type: ignore[method-assign]
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes
    app.json.sort_keys = False  # type: ignore[attr-defined]
    providers.configure(settings.bar_provider, settings.bar_parquet_dir, settings.bar_cache_mb)
    engine = make_engine(settings.require_database_url(), bounds=Bounds.for_api(settings.timeouts))
    redis_pool = api_redis_pool(settings)
    app.extensions["alphaforge"] = ApiServices(
        settings=settings,
        engine=engine,
        session_factory=make_session_factory(engine),
        celery=create_celery(settings),
        redis=redis.Redis(connection_pool=redis_pool),
        artifacts=ArtifactStore.from_settings(settings),
    )
    register_error_handlers(app)
    # Hooks run in this order: request id, authentication, body checks, then rate limits.
    init_request_ids(app)
    init_auth(app, settings)
    app.before_request(_require_json_body)
    limiter = init_rate_limits(app, settings, redis_pool)

    from api import accounts, artifacts, audit, calculations, events, health, interactive, jobs, previews, runs, scripts

    app.register_api(calculations.bp)
    app.register_api(interactive.bp)
    app.register_api(jobs.bp)
    app.register_api(health.bp)
    app.register_api(accounts.bp)
    app.register_api(scripts.bp)
    app.register_api(audit.bp)
    app.register_api(runs.bp)
    app.register_api(events.bp)
    app.register_api(artifacts.bp)
    app.register_api(previews.bp)
    from api import metrics, nightly, webhooks

    app.register_api(nightly.latest_bp)
    app.register_api(nightly.runs_bp)
    app.register_api(metrics.bp)
    app.register_api(webhooks.bp)
    from api import presets, universes

    app.register_api(universes.bp)
    app.register_api(presets.bp)
    from api import optimizations

    app.register_api(optimizations.bp)
    metrics.init_request_metrics(app)
    apply_rate_limits(app, limiter, settings)

    @app.get("/api/docs", doc_ui=False)
    def docs() -> Response:
        return redirect("/api/swagger", code=302)  # type: ignore[return-value]

    return app
