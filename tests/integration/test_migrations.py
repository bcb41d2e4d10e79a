"""The Alembic revisions and the typed models describe the same schema (no model change without a revision); a
revision's backfill."""

from __future__ import annotations

import secrets
import uuid

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, create_engine, text

from shared.infra import dbadmin, migrate
from shared.infra.db import normalize_database_url
from shared.infra.models import Base
from tests.conftest import ServerUrls


def test_models_match_migrated_schema(engine: Engine) -> None:
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []


def test_0015_marks_ended_optimisations_with_an_outcome_finalized(test_servers: ServerUrls) -> None:
    """Upgrading from 0014: an ended optimisation whose outcome was stored is finalized at its end; one without an
    outcome, or with a slice still open, is left for the reconciler's finalize pass (a worker computes it)."""
    name = f"af_migrate_{secrets.token_hex(4)}"
    url = dbadmin.create_database(test_servers.server_database_url, name)
    engine = create_engine(normalize_database_url(url))
    try:
        migrate.upgrade(url, "0014_shard_leases")
        jobs = {case: uuid.uuid4() for case in ("with_outcome", "without_outcome", "slice_open", "running")}
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO users (id, username, password_hash, role) VALUES ('u1', 'u1', 'x', 'user')"))
            for case, job_id in jobs.items():
                ended = case != "running"
                conn.execute(
                    text(
                        "INSERT INTO jobs (id, kind, status, owner_id, column_name, script, script_sha256, symbols,"
                        " symbols_sha256, params, shard_size, shards_total, shards_done, shards_failed,"
                        " symbols_total, symbols_done, symbols_failed, finished_at)"
                        " VALUES (:id, 'optimization', :status, 'u1', 'opt', '', '', ARRAY['A'], '', '{}', 1, 1,"
                        " :done, 0, 1, 0, 0, CASE WHEN :ended THEN now() - interval '1 day' END)"
                    ),
                    {"id": job_id, "status": "succeeded" if ended else "running", "done": int(ended), "ended": ended},
                )
                outcome = None if case == "without_outcome" else '{"status": "succeeded"}'
                conn.execute(
                    text(
                        "INSERT INTO optimizations (job_id, owner_id, strategy, spec, spec_hash, combos, outcome)"
                        " VALUES (:id, 'u1', 'dual_sma', '{}', :hash, 1, CAST(:outcome AS jsonb))"
                    ),
                    {"id": job_id, "hash": case, "outcome": outcome},
                )
                shard_status = "running" if case in ("slice_open", "running") else "succeeded"
                conn.execute(
                    text(
                        "INSERT INTO job_shards (job_id, index, symbols, status, task_id, attempts)"
                        " VALUES (:id, 0, ARRAY[]::varchar[], :status, :task, 1)"
                    ),
                    {"id": job_id, "status": shard_status, "task": str(uuid.uuid4())},
                )
        migrate.upgrade(url)
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT id, finalized_at, finished_at FROM jobs")).all()
        finalized = {job_id: (at, end) for job_id, at, end in rows}
        at, end = finalized[jobs["with_outcome"]]
        assert at is not None and at == end
        assert all(finalized[jobs[n]][0] is None for n in ("without_outcome", "slice_open", "running"))
    finally:
        engine.dispose()
        dbadmin.drop_database(test_servers.server_database_url, name)
