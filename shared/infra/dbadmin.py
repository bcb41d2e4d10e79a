"""Create and drop whole databases on a server (tests and benchmarks use a fresh one each run)."""

from __future__ import annotations

import re

from sqlalchemy import create_engine, pool, text
from sqlalchemy.engine import make_url

from shared.infra.db import normalize_database_url

_SAFE_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def with_database(url: str, name: str) -> str:
    """The same server URL, pointing at database ``name``."""
    return make_url(normalize_database_url(url)).set(database=name).render_as_string(hide_password=False)


def _run_admin(server_url: str, name: str, *statements: str) -> None:
    """Run DDL on the server's maintenance database (CREATE/DROP DATABASE cannot run in a transaction)."""
    if not _SAFE_NAME.match(name):
        raise ValueError(f"unsafe database name {name!r}")
    engine = create_engine(with_database(server_url, "postgres"), poolclass=pool.NullPool, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            for statement in statements:
                conn.execute(text(statement.format(name=name)))
    finally:
        engine.dispose()


def create_database(server_url: str, name: str) -> str:
    """A fresh, empty database ``name`` (dropped first if it exists); returns its URL."""
    _run_admin(server_url, name, 'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', 'CREATE DATABASE "{name}"')
    return with_database(server_url, name)


def drop_database(server_url: str, name: str) -> None:
    _run_admin(server_url, name, 'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
