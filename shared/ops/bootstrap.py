"""The development bootstrap of ``alphaforge up``: migrations, the demo universe in an empty database, and in
*embedded mode* (``up`` starts a server of its own) the secrets and the demo account nobody configured.

In embedded mode a missing ``JWT_SECRET_KEY`` is generated once and kept in ``<data dir>/jwt-secret``, Flower's
``FLOWER_BASIC_AUTH`` likewise in ``<data dir>/flower-auth.json``, and a ``demo`` account is created (its password
kept in ``<data dir>/demo-account.json``). With both URLs set nothing is made up: no default secret, no account,
and ``up`` refuses to start without ``JWT_SECRET_KEY`` and ``FLOWER_BASIC_AUTH``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import time
from pathlib import Path

from shared.errors import ConfigError, StartupError
from shared.infra.config import Settings

log = logging.getLogger("alphaforge.up")


def load_demo_data_if_empty(database_url: str, *, symbols: int, years: int) -> None:
    from sqlalchemy import text

    from shared.infra.db import make_engine

    engine = make_engine(database_url, pool_size=1)
    try:
        with engine.connect() as conn:
            has_bars = conn.execute(text("SELECT EXISTS (SELECT 1 FROM bar_series)")).scalar()
        if has_bars or symbols == 0 or years == 0:
            return
        from shared.marketdata.demo import load_demo_universe

        log.info("empty database: loading the demo universe (%d symbols, %d years)", symbols, years)
        started = time.monotonic()
        load_demo_universe(engine, symbols=symbols, years=years, seed=42)
        log.info("demo universe loaded in %.1f s", time.monotonic() - started)
    finally:
        engine.dispose()


JWT_SECRET_FILE = "jwt-secret"
DEMO_ACCOUNT_FILE = "demo-account.json"
DEMO_USERNAME = "demo"


def is_embedded_mode(settings: Settings) -> bool:
    """`up` starts at least one server of its own: a development machine, where defaults may be made up."""
    return not settings.database_url or not settings.redis_url


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def resolve_jwt_secret(settings: Settings, data_dir: Path) -> str:
    """JWT_SECRET_KEY if set; in embedded mode a generated one kept in the data dir; otherwise a StartupError."""
    if settings.jwt_secret_key or not is_embedded_mode(settings):
        try:
            return settings.require_jwt_secret()
        except ConfigError as exc:
            hint = "" if settings.jwt_secret_key else " (with DATABASE_URL and REDIS_URL both set, none is made up)"
            raise StartupError(f"{exc}{hint}") from None
    path = data_dir / JWT_SECRET_FILE
    if path.is_file():
        secret = path.read_text().strip()
        if len(secret) >= 32:
            return secret
    secret = secrets.token_urlsafe(48)
    _write_private(path, secret + "\n")
    log.info("embedded mode: generated a JWT secret in %s", path)
    return secret


FLOWER_AUTH_FILE = "flower-auth.json"
FLOWER_USERNAME = "ops"


def resolve_flower_auth(settings: Settings, data_dir: Path) -> tuple[str, str]:
    """Flower's (user, password): FLOWER_BASIC_AUTH if set; in embedded mode generated once and kept in the data
    dir (printed in the banner); otherwise a StartupError. Flower is never started open."""
    if settings.flower_basic_auth or not is_embedded_mode(settings):
        try:
            return settings.require_flower_basic_auth()
        except ConfigError as exc:
            hint = "" if settings.flower_basic_auth else " (with DATABASE_URL and REDIS_URL both set, none is made up)"
            raise StartupError(f"{exc}{hint}") from None
    path = data_dir / FLOWER_AUTH_FILE
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        saved = json.loads(path.read_text())
        checked = settings.with_overrides(flower_basic_auth=f"{saved['username']}:{saved['password']}")
        return checked.require_flower_basic_auth()
    password = secrets.token_urlsafe(18)
    _write_private(path, json.dumps({"username": FLOWER_USERNAME, "password": password}) + "\n")
    log.info("embedded mode: generated Flower credentials in %s", path)
    return FLOWER_USERNAME, password


def ensure_demo_account(database_url: str, data_dir: Path) -> tuple[str, str]:
    """The demo account (created, or its password reset when the credentials file is gone); returns
    (username, password)."""
    from shared.accounts import passwords, users
    from shared.infra.db import make_engine, make_session_factory, session_scope
    from shared.infra.models import User

    path = data_dir / DEMO_ACCOUNT_FILE
    saved: dict[str, str] = {}
    with contextlib.suppress(OSError, ValueError):
        saved = json.loads(path.read_text())
    engine = make_engine(database_url, pool_size=1)
    try:
        with session_scope(make_session_factory(engine)) as session:
            user = users.find_user(session, DEMO_USERNAME)
            password = saved.get("password") if saved.get("username") == DEMO_USERNAME else None
            if user is not None and password and passwords.verify_password(user.password_hash, password):
                return DEMO_USERNAME, password
            password = secrets.token_urlsafe(12)
            if user is None:
                user = users.create_user(session, DEMO_USERNAME, password)
            else:
                users.set_password(session, user, password)
            assert isinstance(user, User)
        _write_private(path, json.dumps({"username": DEMO_USERNAME, "password": password}) + "\n")
        return DEMO_USERNAME, password
    finally:
        engine.dispose()


def prepare_database(
    database_url: str, data_dir: Path, *, embedded_mode: bool, settings: Settings
) -> tuple[str, str] | None:
    """Migrate, load the demo universe into an empty database, and in embedded mode make sure of the demo account
    (returned as (username, password) for the banner). The demo's size: ``settings.demo_symbols``, ``demo_years``."""
    from shared.infra import migrate

    log.info("applying database migrations")
    migrate.upgrade(database_url)
    load_demo_data_if_empty(database_url, symbols=settings.demo_symbols, years=settings.demo_years)
    return ensure_demo_account(database_url, data_dir) if embedded_mode else None
