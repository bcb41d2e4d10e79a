"""corporate actions (splits and cash dividends) and listing ranges: what adjusted prices and as-of universes are
computed from; a saved universe's timeframe

Revision ID: 0018_corporate_actions
Revises: 0017_bar_reads
Create Date: 2026-12-08 10:00:00

``corporate_actions`` holds one row per (symbol, kind, ex_date): ``value`` is a split's ratio (new shares per old: 4
for a 4-for-1 split, 0.1 for a 1-for-10 reverse split) or a dividend's cash per share as paid; finite and > 0 (the
check rejects NaN and infinity too: PostgreSQL orders NaN above infinity). An import that changes a symbol's actions
gives every bar series of that symbol a new ``data_version`` (adjusted prices changed), like a bar import.

``symbols.listed_on`` is a symbol's first trading date, ``delisted_on`` the last one of a delisted symbol (NULL:
still listed); a delisted symbol keeps its row and its bars (no survivorship bias). ``exchange_tz`` is the IANA name
of the exchange's time zone, which dates an intraday bar. ``universes.timeframe`` is the timeframe a saved universe
is meant for (``1d`` by default).

Backfill: ``listed_on`` is the date of each symbol's first daily bar (a daily bar's ``ts`` is its date at 00:00 UTC);
symbols without daily bars stay NULL. The downgrade drops the table and the columns.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0018_corporate_actions"
down_revision: str | None = "0017_bar_reads"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UNIVERSE_TIMEFRAMES = ("1m", "5m", "15m", "30m", "1h", "1d", "1w", "1mo")


def upgrade() -> None:
    op.create_table(
        "corporate_actions",
        sa.Column("symbol", sa.String(32), sa.ForeignKey("symbols.symbol", ondelete="CASCADE"), nullable=False),
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("ex_date", sa.Date(), nullable=False),
        sa.Column("value", sa.Double(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint("symbol", "kind", "ex_date"),
        sa.CheckConstraint("kind IN ('split', 'dividend')", name="ck_corporate_actions_kind"),
        sa.CheckConstraint("value > 0 AND value < 'Infinity'::float8", name="ck_corporate_actions_value"),
    )
    op.add_column("symbols", sa.Column("exchange_tz", sa.Text(), nullable=False, server_default="America/New_York"))
    op.add_column("symbols", sa.Column("listed_on", sa.Date(), nullable=True))
    op.add_column("symbols", sa.Column("delisted_on", sa.Date(), nullable=True))
    op.execute(
        "UPDATE symbols s SET listed_on = (to_timestamp(h.first_ts) AT TIME ZONE 'UTC')::date"
        " FROM bar_series h WHERE h.symbol = s.symbol AND h.timeframe = '1d' AND h.bars > 0"
    )
    op.add_column("universes", sa.Column("timeframe", sa.String(4), nullable=False, server_default="1d"))
    allowed = ", ".join(f"'{t}'" for t in UNIVERSE_TIMEFRAMES)
    op.create_check_constraint("ck_universes_timeframe", "universes", f"timeframe IN ({allowed})")


def downgrade() -> None:
    op.drop_constraint("ck_universes_timeframe", "universes", type_="check")
    op.drop_column("universes", "timeframe")
    op.drop_column("symbols", "delisted_on")
    op.drop_column("symbols", "listed_on")
    op.drop_column("symbols", "exchange_tz")
    op.drop_table("corporate_actions")
