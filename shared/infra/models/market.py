"""Market data: symbols, their listing ranges, bar series and corporate actions (shared/marketdata)."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Date,
    DateTime,
    Double,
    ForeignKey,
    ForeignKeyConstraint,
    Integer,
    LargeBinary,
    String,
    Text,
    func,
)
from sqlalchemy.orm import Mapped, mapped_column

from shared.infra.models.base import Base


class Symbol(Base):
    __tablename__ = "symbols"

    symbol: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str | None] = mapped_column(Text)
    is_synthetic: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default="false")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    # The exchange's time zone (IANA name): the trading date of an intraday bar is its time there.
    exchange_tz: Mapped[str] = mapped_column(Text, nullable=False, server_default="America/New_York")
    # The listing range (shared/marketdata/listings.py): first trading date (kept at or before the first bar), and
    # the last trading date of a delisted symbol (NULL: still listed). A delisted symbol keeps its row and bars.
    listed_on: Mapped[dt.date | None] = mapped_column(Date)
    delisted_on: Mapped[dt.date | None] = mapped_column(Date)


class BarSeries(Base):
    """One symbol's bars at one timeframe: its data version (the import that last changed it), a summary, chunks."""

    __tablename__ = "bar_series"
    __table_args__ = (CheckConstraint("timeframe IN ('1m', '5m', '15m', '30m', '1h', '1d')", name="ck_bar_series_tf"),)

    symbol: Mapped[str] = mapped_column(String(32), ForeignKey("symbols.symbol", ondelete="CASCADE"), primary_key=True)
    timeframe: Mapped[str] = mapped_column(String(4), primary_key=True)
    data_version: Mapped[int] = mapped_column(BigInteger, nullable=False)
    bars: Mapped[int] = mapped_column(Integer, nullable=False)
    first_ts: Mapped[int] = mapped_column(BigInteger, nullable=False)  # epoch seconds, UTC
    last_ts: Mapped[int] = mapped_column(BigInteger, nullable=False)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=func.now(), nullable=False)


class BarChunk(Base):  # a chunk of a series: its bars as contiguous columns in one bytea (marketdata/series.py)
    __tablename__ = "bar_chunks"
    __table_args__ = (
        ForeignKeyConstraint(
            ["symbol", "timeframe"], ["bar_series.symbol", "bar_series.timeframe"], ondelete="CASCADE"
        ),
        CheckConstraint("bars > 0 AND octet_length(data) = bars * 48", name="ck_bar_chunks_layout"),
    )

    symbol: Mapped[str] = mapped_column(String(32), primary_key=True)
    timeframe: Mapped[str] = mapped_column(String(4), primary_key=True)
    chunk_start: Mapped[dt.date] = mapped_column(Date, primary_key=True)
    bars: Mapped[int] = mapped_column(Integer, nullable=False)
    first_ts: Mapped[int] = mapped_column(BigInteger, nullable=False)
    last_ts: Mapped[int] = mapped_column(BigInteger, nullable=False)
    data: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)


class CorporateAction(Base):
    """A split (``value``: new shares per old, 4.0 for 4-for-1) or a cash dividend (``value``: cash per share as
    paid) of a symbol on its ex-date; imported by shared/marketdata/actions.py, read as ``adjust.Actions``."""

    __tablename__ = "corporate_actions"
    __table_args__ = (
        CheckConstraint("kind IN ('split', 'dividend')", name="ck_corporate_actions_kind"),
        CheckConstraint("value > 0 AND value < 'Infinity'::float8", name="ck_corporate_actions_value"),
    )

    symbol: Mapped[str] = mapped_column(String(32), ForeignKey("symbols.symbol", ondelete="CASCADE"), primary_key=True)
    kind: Mapped[str] = mapped_column(String(8), primary_key=True)
    ex_date: Mapped[dt.date] = mapped_column(Date, primary_key=True)
    value: Mapped[float] = mapped_column(Double, nullable=False)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=func.now(), nullable=False)
