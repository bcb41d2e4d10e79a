"""The Alembic revisions and the typed models describe the same schema (no model change without a revision); a
revision's backfill."""

from __future__ import annotations

import datetime as dt
import random
import secrets
import uuid

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.exc import IntegrityError

from shared.infra import dbadmin, migrate
from shared.infra.db import normalize_database_url
from shared.infra.models import Base
from tests.conftest import ServerUrls
from tests.helpers import stored_rows


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


def test_0016_moves_daily_rows_into_column_series_and_back(test_servers: ServerUrls) -> None:
    """Upgrading from 0015: every daily row is in the column store, bit for bit, chunked by decade, each series with
    a data version; downgrading writes the same rows back."""
    name = f"af_migrate_{secrets.token_hex(4)}"
    url = dbadmin.create_database(test_servers.server_database_url, name)
    engine = create_engine(normalize_database_url(url))
    rng = random.Random(3)
    days = [dt.date(2019, 12, 30) + dt.timedelta(days=i) for i in range(5)]  # across a decade's boundary
    rows = sorted(
        (symbol, day, rng.random(), rng.random() + 1, rng.random() / 7, 1 / 3 + k, 2**53 - k)
        for symbol in ("A", "BRK.B", "Z9") for k, day in enumerate(days)
    )  # fmt: skip
    try:
        migrate.upgrade(url, "0015_job_finalization")
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO symbols (symbol) VALUES ('A'), ('BRK.B'), ('Z9'), ('NOBARS')"))
            conn.execute(
                text("INSERT INTO daily_bars VALUES (:s, :d, :o, :h, :l, :c, :v)"),
                [dict(zip("sdohlcv", row, strict=True)) for row in rows],
            )
        migrate.upgrade(url)
        assert stored_rows(engine) == rows
        with engine.connect() as conn:
            chunks = conn.execute(text("SELECT symbol, chunk_start, bars FROM bar_chunks ORDER BY 1, 2")).all()
            series = conn.execute(text("SELECT symbol, bars, data_version FROM bar_series ORDER BY 1")).all()
        assert [tuple(c) for c in chunks] == [
            (s, day, n) for s in ("A", "BRK.B", "Z9") for day, n in ((dt.date(2010, 1, 1), 2), (dt.date(2020, 1, 1), 3))
        ]
        assert [(s, n) for s, n, _ in series] == [("A", 5), ("BRK.B", 5), ("Z9", 5)]
        assert all(v >= 1 for *_, v in series)
        migrate.downgrade(url, "0015_job_finalization")
        with engine.connect() as conn:
            back = conn.execute(text("SELECT * FROM daily_bars ORDER BY symbol, date")).all()
        assert [tuple(r) for r in back] == rows
    finally:
        engine.dispose()
        dbadmin.drop_database(test_servers.server_database_url, name)


def test_0018_adds_corporate_actions_and_listing_ranges_and_back(test_servers: ServerUrls) -> None:
    """Upgrading from 0017: ``listed_on`` is each symbol's first daily bar's date (NULL without daily bars), the
    other new columns take their defaults, and ``corporate_actions`` refuses what is not a split or a dividend of a
    finite value > 0; downgrading drops all of it, and the upgrade applies again."""
    name = f"af_migrate_{secrets.token_hex(4)}"
    url = dbadmin.create_database(test_servers.server_database_url, name)
    engine = create_engine(normalize_database_url(url))

    def ts(day: dt.date) -> int:
        return (day - dt.date(1970, 1, 1)).days * 86_400

    series = [
        ("A", "1d", ts(dt.date(2019, 12, 30))),
        ("A", "1h", ts(dt.date(2019, 6, 3)) + 3600),  # not daily: the backfill reads daily series only
        ("HOURLY", "1h", ts(dt.date(2020, 1, 2))),
        ("OLD", "1d", ts(dt.date(1962, 1, 2))),  # before the epoch: a negative ts
    ]
    try:
        migrate.upgrade(url, "0017_bar_reads")
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO symbols (symbol) VALUES ('A'), ('HOURLY'), ('OLD'), ('NOBARS')"))
            conn.execute(
                text("INSERT INTO bar_series VALUES (:s, :tf, 1, 3, :ts, :ts + 86400, now())"),
                [{"s": s, "tf": tf, "ts": first} for s, tf, first in series],
            )
            conn.execute(text("INSERT INTO users (id, username, password_hash, role) VALUES ('u1', 'u1', 'x', 'user')"))
            conn.execute(text("INSERT INTO universes (id, owner_id, name, description, symbols, version)"
                              " VALUES (:id, 'u1', 'u', '', ARRAY['A'], 1)"), {"id": uuid.uuid4()})  # fmt: skip
        migrate.upgrade(url)
        with engine.connect() as conn:
            symbols = conn.execute(text("SELECT symbol, listed_on, delisted_on, exchange_tz FROM symbols")).all()
            assert conn.scalar(text("SELECT timeframe FROM universes")) == "1d"
        assert sorted(tuple(r) for r in symbols) == [
            ("A", dt.date(2019, 12, 30), None, "America/New_York"),
            ("HOURLY", None, None, "America/New_York"),
            ("NOBARS", None, None, "America/New_York"),
            ("OLD", dt.date(1962, 1, 2), None, "America/New_York"),
        ]
        insert = text("INSERT INTO corporate_actions (symbol, kind, ex_date, value) VALUES ('A', :k, :d, :v)")
        with engine.begin() as conn:
            conn.execute(insert, [{"k": "split", "d": dt.date(2020, 1, 2), "v": 4.0},
                                  {"k": "dividend", "d": dt.date(2020, 1, 2), "v": 0.25}])  # fmt: skip
        for kind, value in (("merger", 1.0), ("split", 0.0), ("split", -1.0), ("split", "NaN"), ("split", "Infinity")):
            with pytest.raises(IntegrityError), engine.begin() as conn:
                conn.execute(insert, {"k": kind, "d": dt.date(2020, 2, 3), "v": value})
        with engine.begin() as conn:
            conn.execute(text("DELETE FROM symbols WHERE symbol = 'A'"))  # its actions go with it
            assert conn.scalar(text("SELECT count(*) FROM corporate_actions")) == 0
        migrate.downgrade(url, "0017_bar_reads")
        with engine.connect() as conn:
            columns = set(conn.scalars(text("SELECT table_name || '.' || column_name FROM information_schema.columns"
                                            " WHERE table_name IN ('symbols', 'universes')")))  # fmt: skip
            assert conn.scalar(text("SELECT to_regclass('corporate_actions')")) is None
        assert not {"symbols.listed_on", "symbols.delisted_on", "symbols.exchange_tz", "universes.timeframe"} & columns
        migrate.upgrade(url)
    finally:
        engine.dispose()
        dbadmin.drop_database(test_servers.server_database_url, name)
