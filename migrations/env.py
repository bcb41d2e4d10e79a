"""Alembic environment: online migrations against the URL given by the caller or DATABASE_URL."""

from __future__ import annotations

import os
from logging.config import fileConfig

from alembic import context
from sqlalchemy import create_engine, pool, text

from shared.infra.db import normalize_database_url
from shared.infra.models import Base

config = context.config
if config.config_file_name is not None and config.attributes.get("configure_logging", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata

# Hosts that start at once (`up` on two machines against one database) migrate one after the other: the second
# waits here, then finds the schema at head. Without it, both apply the same revision and one fails.
MIGRATION_LOCK = "SELECT pg_advisory_lock(hashtextextended('alphaforge:migrations', 0))"
MIGRATION_UNLOCK = "SELECT pg_advisory_unlock(hashtextextended('alphaforge:migrations', 0))"


def _url() -> str:
    url = config.attributes.get("database_url") or os.environ.get("DATABASE_URL")
    if not url:
        raise RuntimeError("no database URL: pass it through shared.infra.migrate or set DATABASE_URL")
    return normalize_database_url(str(url))


def run_migrations_offline() -> None:
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = create_engine(_url(), poolclass=pool.NullPool)
    with engine.connect() as connection:
        connection.execute(text(MIGRATION_LOCK))  # a session lock: held across the revisions' transactions
        connection.commit()
        try:
            context.configure(connection=connection, target_metadata=target_metadata, compare_type=True)
            with context.begin_transaction():
                context.run_migrations()
        finally:
            connection.execute(text(MIGRATION_UNLOCK))
            connection.commit()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
