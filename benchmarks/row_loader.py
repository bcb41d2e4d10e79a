"""The bar loader this product had before the column store, kept as the benchmarks' reference: one row a bar in a
``daily_bars``-shaped table (``bench_daily_rows``), parsed in Python one bar at a time."""

from __future__ import annotations

import datetime as dt
from array import array
from collections.abc import Mapping
from typing import Any

import numpy as np
from sqlalchemy import Connection, Engine, text

from shared.marketdata.series import Columns

_LOAD_SQL = text(
    """
    SELECT symbol, date, open, high, low, close, volume
    FROM bench_daily_rows
    WHERE symbol = ANY(:symbols)
      AND (CAST(:start AS date) IS NULL OR date >= CAST(:start AS date))
    ORDER BY symbol, date
    """
)


def create_row_table(engine: Engine, universe: Mapping[str, Columns]) -> None:
    """``bench_daily_rows`` holding ``universe``'s bars, one row each, as ``daily_bars`` did."""
    with engine.begin() as conn:
        conn.execute(text(
            "CREATE TABLE bench_daily_rows (symbol varchar(32), date date, open float8, high float8, low float8,"
            " close float8, volume bigint, PRIMARY KEY (symbol, date))"
        ))  # fmt: skip
        for symbol, c in universe.items():
            conn.execute(
                text("INSERT INTO bench_daily_rows SELECT :s, unnest(CAST(:d AS date[])), unnest(CAST(:o AS"
                     " float8[])), unnest(CAST(:h AS float8[])), unnest(CAST(:l AS float8[])),"
                     " unnest(CAST(:c AS float8[])), unnest(CAST(:v AS bigint[]))"),
                {"s": symbol, "d": (c.ts // 86_400).astype("datetime64[D]").astype(str).tolist(),
                 "o": c.open.tolist(), "h": c.high.tolist(), "l": c.low.tolist(), "c": c.close.tolist(),
                 "v": c.volume.astype(np.int64).tolist()},
            )  # fmt: skip
        conn.execute(text("ANALYZE bench_daily_rows"))


def row_loader(conn: Connection, symbols: list[str], start: dt.date | None = None) -> dict[str, tuple[Any, ...]]:
    """The old ``load_bars``: per symbol (ISO dates, open, high, low, close, volume as ``array('d')``)."""
    columns: dict[str, tuple[list[str], array, array, array, array, array]] = {}
    current: str | None = None
    cols: tuple[list[str], array, array, array, array, array] | None = None
    for symbol, date, o, h, low, c, v in conn.execute(_LOAD_SQL, {"symbols": symbols, "start": start}):
        if symbol != current:
            current = symbol
            cols = ([], array("d"), array("d"), array("d"), array("d"), array("d"))
            columns[symbol] = cols
        assert cols is not None
        cols[0].append(date.isoformat())
        cols[1].append(o)
        cols[2].append(h)
        cols[3].append(low)
        cols[4].append(c)
        cols[5].append(v)
    return {symbol: (tuple(d), *rest) for symbol, (d, *rest) in columns.items()}
