"""Importing Parquet files and folders of per-symbol files against a real PostgreSQL: exact round trips, the
downloader layout, every bad row named with its file, nothing loaded unless everything is good."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sqlalchemy import Engine

from shared.marketdata.csv_import import BarsImportError
from shared.marketdata.table_import import import_path
from tests.helpers import stored_rows

DAYS = [dt.date(2024, 1, 2), dt.date(2024, 1, 3), dt.date(2024, 1, 4)]
# Values chosen to catch any lossy conversion on the way into float64.
BARS = {
    "AAPL": [
        (0.1, 0.30000000000000004, 0.1, 0.2, 0),
        (1 / 3, 2 / 3, 1 / 7, 0.5, 2**53),
        (99.5, 101.25, 98.0, 100.0, 7),
    ],
    "BRK.B": [(350.25, 352.0, 349.5, 351.75, 3_000_000), (5e-300, 1e300, 5e-300, 5e-300, 1), (2.0, 3.0, 1.0, 2.5, 12)],
}


def _expected(symbols: dict[str, list[tuple[Any, ...]]] = BARS) -> list[tuple[Any, ...]]:
    return [(s, d, *bar) for s in sorted(symbols) for d, bar in zip(DAYS, symbols[s], strict=True)]


def _table(symbol: str | None, bars: list[tuple[Any, ...]], dates: Any = None, **names: str) -> pa.Table:
    columns: dict[str, Any] = {} if symbol is None else {names.get("symbol", "symbol"): [symbol] * len(bars)}
    columns[names.get("date", "date")] = pa.array(dates if dates is not None else DAYS[: len(bars)])
    for k, name in enumerate(("open", "high", "low", "close", "volume")):
        columns[names.get(name, name)] = [bar[k] for bar in bars]
    return pa.table(columns)


def test_a_parquet_file_with_a_symbol_column_round_trips_bit_for_bit(clean_db: Engine, tmp_path: Path) -> None:
    file = tmp_path / "bars.parquet"
    pq.write_table(pa.concat_tables([_table(s, b) for s, b in BARS.items()]), file)
    report = import_path(clean_db, file)
    assert (report.rows, report.symbols, report.inserted, report.updated) == (6, 2, 6, 0)
    assert stored_rows(clean_db) == _expected()
    again = import_path(clean_db, file)  # idempotent
    assert (again.inserted, again.updated) == (0, 0)


def test_a_folder_in_the_downloader_layout_imports_csv_and_parquet_alike(clean_db: Engine, tmp_path: Path) -> None:
    """``Date,Open,High,Low,Close,Adj Close,Volume`` in any case, the symbol in the file's name; Adj Close is not
    imported; dates may be text or Parquet dates."""
    lines = ["Date,Open,High,Low,Close,Adj Close,Volume"]
    lines += [f"{d.isoformat()},{o!r},{h!r},{lo!r},{c!r},{c * 0.9!r},{v}" for d, (o, h, lo, c, v) in
              zip(DAYS, BARS["AAPL"], strict=True)]  # fmt: skip
    (tmp_path / "aapl.csv").write_text("\n".join(lines) + "\n")
    table = _table(None, BARS["BRK.B"], dates=[d.isoformat() for d in DAYS], open="OPEN", close="Close")
    pq.write_table(table.append_column("adj_close", pa.array([1.0, 2.0, 3.0])), tmp_path / "BRK.B.parquet")
    report = import_path(clean_db, tmp_path)
    assert (report.rows, report.symbols, report.inserted) == (6, 2, 6)
    assert stored_rows(clean_db) == _expected()


def _problems(path: Path, engine: Engine) -> list[str]:
    with pytest.raises(BarsImportError) as info:
        import_path(engine, path)
    return [str(p) for p in info.value.problems]


def test_every_bad_row_of_every_file_is_named_and_nothing_is_loaded(clean_db: Engine, tmp_path: Path) -> None:
    good = tmp_path / "GOOD.parquet"
    pq.write_table(_table(None, BARS["AAPL"]), good)
    bad_bars = [(10.0, 12.0, 9.0, 11.0, 5), (-1.0, 12.0, 9.0, 11.0, 5), (10.0, 9.5, 9.0, 11.0, 2.5)]
    pq.write_table(_table(None, bad_bars), tmp_path / "BAD.parquet")
    (tmp_path / "TEXT.csv").write_text("date,open,high,low,close,volume\n2024-01-02,abc,12,9,11,5\n"
                                       "2024-01-02,10,12,9,11,5\n2024-13-01,10,12,9,11,\n")  # fmt: skip
    problems = _problems(tmp_path, clean_db)
    folder = str(tmp_path)
    assert problems == [
        f"{folder}/BAD.parquet, row 2, open: open must be finite and > 0, got -1.0",
        f"{folder}/BAD.parquet, row 3, volume: volume must be a whole number in [0, 2**53], got 2.5",
        f"{folder}/BAD.parquet, row 3, high: high 9.5 is below max(open, close, low) = 11.0",
        f"{folder}/TEXT.csv, line 2, open: open 'abc' is not a number",
        f"{folder}/TEXT.csv, line 4, date: date '2024-13-01' is not a calendar date",
        f"{folder}/TEXT.csv, line 4, volume: volume is empty",
    ]
    assert stored_rows(clean_db) == []  # not even GOOD's bars


def test_repeated_dates_strays_and_a_symbol_in_two_files_are_refused(clean_db: Engine, tmp_path: Path) -> None:
    rows = [BARS["AAPL"][0], BARS["AAPL"][1]]
    pq.write_table(_table(None, rows, dates=[DAYS[0], DAYS[0]]), tmp_path / "DUP.parquet")
    assert _problems(tmp_path / "DUP.parquet", clean_db) == [
        f"{tmp_path}/DUP.parquet, row 2, date: duplicate bar for DUP on 2024-01-02"
    ]
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "notes.txt").write_text("hello")
    assert "not a SYMBOL.csv or SYMBOL.parquet file: notes.txt" in _problems(folder, clean_db)[0]
    (folder / "notes.txt").unlink()
    pq.write_table(_table("TWICE", BARS["AAPL"]), folder / "one.parquet")
    pq.write_table(_table("TWICE", BARS["AAPL"]), folder / "two.parquet")
    assert _problems(folder, clean_db) == [f"{folder}/two.parquet, symbol: TWICE is also in {folder}/one.parquet"]
    assert stored_rows(clean_db) == []


def test_columns_and_symbols_are_checked_before_any_value(clean_db: Engine, tmp_path: Path) -> None:
    file = tmp_path / "x.parquet"
    pq.write_table(_table("A", BARS["AAPL"]).drop_columns(["volume"]).append_column("vwap", pa.array([1.0] * 3)),
                   file)  # fmt: skip
    (message,) = _problems(file, clean_db)
    assert "missing column(s) volume" in message and "unexpected column(s) 'vwap'" in message
    pq.write_table(_table("bad symbol!", BARS["AAPL"]), file)
    assert _problems(file, clean_db)[0].startswith(f"{file}, row 1, symbol: invalid symbol 'bad symbol!'")
    nan = [(float("nan"), 12.0, 9.0, 11.0, 5)]
    pq.write_table(_table("A", nan), file)
    assert _problems(file, clean_db) == [f"{file}, row 1, open: open must be finite, got nan"]
    assert stored_rows(clean_db) == []


def test_a_large_parquet_import_is_one_transaction_of_columns(clean_db: Engine, tmp_path: Path) -> None:
    n, symbols = 2520, [f"P{i:03d}" for i in range(50)]
    rng = np.random.default_rng(1)
    close = 100 * np.exp(np.cumsum(rng.normal(0, 0.02, (len(symbols), n)), axis=1))
    days = np.busday_offset(np.datetime64("2015-01-02"), np.arange(n), roll="forward")
    table = pa.table({
        "symbol": np.repeat(symbols, n), "date": np.tile(days, len(symbols)), "open": close.ravel(),
        "high": close.ravel() * 1.01, "low": close.ravel() * 0.99, "close": close.ravel(),
        "volume": rng.integers(0, 10**6, close.size).astype(np.int64),
    })  # fmt: skip
    pq.write_table(table, tmp_path / "big.parquet")
    report = import_path(clean_db, tmp_path / "big.parquet")
    assert (report.rows, report.symbols, report.inserted) == (n * len(symbols), 50, n * len(symbols))
    stored = stored_rows(clean_db)
    assert len(stored) == n * len(symbols) and stored[0][0] == "P000" and stored[-1][5] == close[-1, -1]
