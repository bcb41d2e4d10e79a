"""bars as column series: bar_series (one row per symbol and timeframe, with its data version) and bar_chunks
(its bars as contiguous little-endian columns, one bytea per chunk); daily_bars moves into them and is dropped;
jobs record the data they are computed from, and runs and optimisations are identified by it too

Revision ID: 0016_bar_series
Revises: 0015_job_finalization
Create Date: 2026-12-07 15:00:00

Layout of ``bar_chunks.data`` (shared/marketdata/series.py): ``ts`` int64 epoch seconds, then open, high, low,
close, volume float64, each ``bars`` values. Its storage is EXTERNAL: out of line, uncompressed, so a read is a
copy, not a decompression. ``bar_data_version`` numbers imports; every series an import changes takes its number.

``jobs.data_sha256`` / ``data_version`` are the data a job was submitted on (the SHA-256 of its symbols' data
versions, the newest of them), ``job_results.data_version`` what each symbol's result was computed from. A run's and
an optimisation's identity gains ``data_sha256``: the same definition on re-imported bars is a new one. Rows from
before stay NULL (found by no new submission: the first one after the upgrade makes a new run).

Backfill: the daily bars move 200 symbols at a time (a decade per chunk), each batch a data version. The downgrade
writes the daily series back as rows (finer timeframes have no place there and are dropped with the tables).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import numpy as np
import sqlalchemy as sa
from alembic import op

from shared.marketdata import store
from shared.marketdata.series import Columns, unpack

revision: str = "0016_bar_series"
down_revision: str | None = "0015_job_finalization"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TIMEFRAMES = ("1m", "5m", "15m", "30m", "1h", "1d")
_BATCH = 200  # symbols moved per statement pair


def _cursor() -> Any:
    return cast(Any, op.get_bind().connection).driver_connection.cursor()


def upgrade() -> None:
    op.execute("CREATE SEQUENCE bar_data_version")
    allowed = ", ".join(f"'{t}'" for t in TIMEFRAMES)
    op.create_table(
        "bar_series",
        sa.Column("symbol", sa.String(32), sa.ForeignKey("symbols.symbol", ondelete="CASCADE"), nullable=False),
        sa.Column("timeframe", sa.String(4), nullable=False),
        sa.Column("data_version", sa.BigInteger(), nullable=False),
        sa.Column("bars", sa.Integer(), nullable=False),
        sa.Column("first_ts", sa.BigInteger(), nullable=False),
        sa.Column("last_ts", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint("symbol", "timeframe"),
        sa.CheckConstraint(f"timeframe IN ({allowed})", name="ck_bar_series_tf"),
    )
    op.create_table(
        "bar_chunks",
        sa.Column("symbol", sa.String(32), nullable=False),
        sa.Column("timeframe", sa.String(4), nullable=False),
        sa.Column("chunk_start", sa.Date(), nullable=False),
        sa.Column("bars", sa.Integer(), nullable=False),
        sa.Column("first_ts", sa.BigInteger(), nullable=False),
        sa.Column("last_ts", sa.BigInteger(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("symbol", "timeframe", "chunk_start"),
        sa.ForeignKeyConstraint(
            ["symbol", "timeframe"], ["bar_series.symbol", "bar_series.timeframe"], ondelete="CASCADE"
        ),
        sa.CheckConstraint("bars > 0 AND octet_length(data) = bars * 48", name="ck_bar_chunks_layout"),
    )
    op.execute("ALTER TABLE bar_chunks ALTER COLUMN data SET STORAGE EXTERNAL")
    _move_daily_rows()
    op.drop_table("daily_bars")
    op.add_column("jobs", sa.Column("data_sha256", sa.String(64), nullable=True))
    op.add_column("jobs", sa.Column("data_version", sa.BigInteger(), nullable=True))
    op.add_column("job_results", sa.Column("data_version", sa.BigInteger(), nullable=True))
    for table, key, old, new in _IDENTITIES:
        op.add_column(table, sa.Column("data_sha256", sa.String(64), nullable=True))
        op.drop_constraint(old, table, type_="unique")
        op.create_unique_constraint(new, table, ["owner_id", key, "data_sha256"])


# A run's and an optimisation's identity: (table, hash column, unique constraint before, after).
_IDENTITIES = (
    ("backtest_runs", "config_hash", "uq_backtest_runs_owner_config", "uq_backtest_runs_owner_config_data"),
    ("optimizations", "spec_hash", "uq_optimizations_owner_spec", "uq_optimizations_owner_spec_data"),
)


def _move_daily_rows() -> None:
    cursor = _cursor()
    cursor.execute("SELECT symbol FROM daily_bars GROUP BY symbol ORDER BY symbol")
    symbols = [row[0] for row in cursor.fetchall()]
    for lo in range(0, len(symbols), _BATCH):
        batch = symbols[lo : lo + _BATCH]
        cursor.execute(
            "SELECT symbol, array_agg((date - DATE '1970-01-01') ORDER BY date), array_agg(open ORDER BY date),"
            " array_agg(high ORDER BY date), array_agg(low ORDER BY date), array_agg(close ORDER BY date),"
            " array_agg(volume::float8 ORDER BY date)"
            " FROM daily_bars WHERE symbol = ANY(%s::varchar[]) GROUP BY symbol",
            (batch,),
        )
        incoming = {
            symbol: store.columns_of(np.asarray(days, dtype=np.int64) * 86_400, o, h, low, c, v)
            for symbol, days, o, h, low, c, v in cursor.fetchall()
        }
        store.write_series(cursor, "1d", incoming)


def downgrade() -> None:
    for table, key, old, new in _IDENTITIES:
        # the same definition on several data versions: keep the newest run of each (older ones cannot be unique)
        op.execute(
            f"DELETE FROM jobs WHERE id IN (SELECT job_id FROM (SELECT job_id, row_number() OVER (PARTITION BY"
            f" owner_id, {key} ORDER BY created_at DESC) AS n FROM {table}) t WHERE n > 1)"
        )
        op.drop_constraint(new, table, type_="unique")
        op.create_unique_constraint(old, table, ["owner_id", key])
        op.drop_column(table, "data_sha256")
    op.drop_column("job_results", "data_version")
    op.drop_column("jobs", "data_version")
    op.drop_column("jobs", "data_sha256")
    op.create_table(
        "daily_bars",
        sa.Column("symbol", sa.String(32), sa.ForeignKey("symbols.symbol", ondelete="CASCADE"), nullable=False),
        sa.Column("date", sa.Date(), nullable=False),
        sa.Column("open", sa.Double(), nullable=False),
        sa.Column("high", sa.Double(), nullable=False),
        sa.Column("low", sa.Double(), nullable=False),
        sa.Column("close", sa.Double(), nullable=False),
        sa.Column("volume", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("symbol", "date"),
    )
    cursor = _cursor()
    cursor.execute("SELECT symbol, bars, data FROM bar_chunks WHERE timeframe = '1d' ORDER BY symbol, chunk_start")
    for symbol, bars, data in cursor.fetchall():
        columns: Columns = unpack(bytes(data), bars)
        days = (columns.ts // 86_400).astype("datetime64[D]").astype(str).tolist()
        rows = zip(
            [symbol] * bars, days, columns.open.tolist(), columns.high.tolist(), columns.low.tolist(),
            columns.close.tolist(), [int(v) for v in columns.volume.tolist()], strict=True,
        )  # fmt: skip
        cursor.executemany("INSERT INTO daily_bars VALUES (%s, %s, %s, %s, %s, %s, %s)", list(rows))
    op.drop_table("bar_chunks")
    op.drop_table("bar_series")
    op.execute("DROP SEQUENCE bar_data_version")
