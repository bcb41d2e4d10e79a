"""Flask application factory. Nothing connects at import time: ``create_app`` builds every client."""

from __future__ import annotations

from dataclasses import dataclass

import redis
from celery import Celery
from flask import Response, current_app, redirect, request
from flask_openapi3 import Info, OpenAPI
from pydantic import ValidationError
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from api.errors import register_error_handlers, validation_error_response
from shared.config import Settings
from shared.db import make_engine, make_session_factory
from shared.errors import InvalidJson, UnsupportedMediaType
from worker.celery_app import create_celery

API_VERSION = "0.1.0"


@dataclass(frozen=True)
class ApiServices:
    """Everything a request handler needs, built once per app and passed explicitly."""

    settings: Settings
    engine: Engine
    session_factory: sessionmaker[Session]
    celery: Celery
    redis: redis.Redis


def services() -> ApiServices:
    svc: ApiServices = current_app.extensions["alphaforge"]
    return svc


def _validation_error(exc: ValidationError) -> Response:
    return validation_error_response(exc)


def _require_json_body() -> None:
    """Malformed or non-JSON bodies get a clear 4xx before any handler sees them."""
    if request.method not in ("POST", "PUT", "PATCH") or not request.content_length:
        return
    if not request.is_json:
        raise UnsupportedMediaType("send the body as JSON with Content-Type: application/json")
    if request.get_json(silent=True) is None:
        try:
            request.get_json()
        except Exception as exc:
            raise InvalidJson(f"request body is not valid JSON: {getattr(exc, 'description', exc)}") from None
        raise InvalidJson("request body is not valid JSON")


def create_app(settings: Settings | None = None) -> OpenAPI:
    settings = settings or Settings.from_env()
    app = OpenAPI(
        __name__,
        info=Info(title="AlphaForge API", version=API_VERSION),
        doc_prefix="/api",
        doc_url="/openapi.json",
        validation_error_status=422,
        validation_error_callback=_validation_error,
    )
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes
    app.json.sort_keys = False  # type: ignore[attr-defined]
    engine = make_engine(settings.require_database_url())
    app.extensions["alphaforge"] = ApiServices(
        settings=settings,
        engine=engine,
        session_factory=make_session_factory(engine),
        celery=create_celery(settings),
        redis=redis.Redis.from_url(
            settings.require_redis_url(), socket_connect_timeout=2, socket_timeout=2, health_check_interval=30
        ),
    )
    register_error_handlers(app)
    app.before_request(_require_json_body)

    from api import calculations, health, jobs

    app.register_api(calculations.bp)
    app.register_api(jobs.bp)
    app.register_api(health.bp)

    @app.get("/api/docs", doc_ui=False)
    def docs() -> Response:
        return redirect("/api/swagger", code=302)  # type: ignore[return-value]

    return app
