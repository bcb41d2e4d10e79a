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


# --------------------------------------------------------------------------------------------------
# Intraday bars: a timestamp column, --timeframe / --tz, read back bit for bit at every stored timeframe
# --------------------------------------------------------------------------------------------------


def _intraday(seconds: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` bars ``seconds`` apart from 2024-03-08 14:30 UTC (across the US clock change), with a gap, and awkward
    float values."""
    rng = np.random.default_rng(seed)
    ts = 1_709_908_200 + seconds * np.arange(n, dtype=np.int64)
    ts[n // 2 :] += 3 * seconds  # a gap: missing bars are not an error
    close = 100 * np.exp(np.cumsum(rng.normal(0, 1e-3, n)))
    values = np.stack([close * (1 + 1e-4), close * 1.001 + 1 / 3, close * 0.999, close, rng.integers(0, 10**6, n)])
    return ts, values.astype(np.float64)


@pytest.mark.parametrize("timeframe", ["1m", "5m", "15m", "30m", "1h"])
def test_intraday_parquet_round_trips_bit_for_bit_with_the_timeframe_inferred(
    clean_db: Engine, tmp_path: Path, timeframe: str
) -> None:
    from shared.marketdata import store
    from shared.marketdata.series import TIMEFRAME_SECONDS

    ts, values = _intraday(TIMEFRAME_SECONDS[timeframe], 400, seed=len(timeframe))
    columns: dict[str, Any] = {"Timestamp": pa.array(ts * 1_000_000, pa.timestamp("us", tz="UTC"))}
    columns |= {name: values[k] for k, name in enumerate(("Open", "High", "Low", "Close", "Volume"))}
    pq.write_table(pa.table(columns), tmp_path / "MSFT.parquet")
    report = import_path(clean_db, tmp_path)
    assert (report.rows, report.inserted, report.updated) == (400, 400, 0)
    with clean_db.connect() as conn:
        read = store.read_series(conn, ["MSFT"], timeframe, cache=store.ChunkCache(0))["MSFT"].columns
        assert store.read_series(conn, ["MSFT"], "1d", cache=store.ChunkCache(0)) == {}
    assert read.ts.tobytes() == ts.tobytes() and read.values().tobytes() == values.tobytes()
    assert import_path(clean_db, tmp_path).inserted == 0  # idempotent


def test_intraday_csv_timestamps_with_offsets_or_in_a_named_zone_are_the_same_instants(
    clean_db: Engine, tmp_path: Path
) -> None:
    """One symbol's hourly bars written with UTC offsets, another's as New York wall-clock time with ``tz``: across
    the clock change of 2024-03-10 both are stored as the same UTC instants."""
    from zoneinfo import ZoneInfo

    from shared.marketdata import store

    ts = np.array([1_709_908_200 + 3600 * k for k in range(3)] + [1_710_163_800, 1_710_167_400], dtype=np.int64)
    zone = ZoneInfo("America/New_York")
    stamps = [dt.datetime.fromtimestamp(int(t), zone) for t in ts]
    rows = "\n".join(f"{{}},{k + 1}.0,{k + 2}.0,{k + 0.5},{k + 1.5},{100 + k}" for k in range(len(ts)))
    with_offsets = [s.isoformat() for s in stamps]
    wall_clock = [s.replace(tzinfo=None).isoformat(sep=" ") for s in stamps]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "OFF.csv").write_text("timestamp,open,high,low,close,volume\n" + rows.format(*with_offsets))
    (tmp_path / "b" / "WALL.csv").write_text("Datetime,Open,High,Low,Close,Volume\n" + rows.format(*wall_clock))
    with pytest.raises(BarsImportError, match="need --tz"):
        import_path(clean_db, tmp_path / "b", timeframe="1h")
    import_path(clean_db, tmp_path / "a", timeframe="1h")
    import_path(clean_db, tmp_path / "b", timeframe="1h", tz="America/New_York")
    with clean_db.connect() as conn:
        read = store.read_series(conn, ["OFF", "WALL"], "1h", cache=store.ChunkCache(0))
    assert read["OFF"].columns.ts.tolist() == read["WALL"].columns.ts.tolist() == ts.tolist()


def test_bad_intraday_rows_are_named_and_nothing_is_loaded(clean_db: Engine, tmp_path: Path) -> None:
    lines = [
        "symbol,timestamp,open,high,low,close,volume",
        "AAA,2024-01-02T14:30:00Z,1,2,0.5,1.5,10",
        "AAA,2024-01-02T14:35:00Z,1,2,0.5,1.5,10",
        "AAA,2024-01-02T14:37:00Z,1,2,0.5,1.5,10",  # 2 minutes after the previous bar: not a 5m bar
        "AAA,2024-01-02T14:35:00Z,1,2,0.5,1.5,10",  # repeated
        "AAA,yesterday,1,2,0.5,1.5,10",
        "BBB,2024-01-02T14:30:00Z,1,2,0.5,1.5,10",
    ]
    (tmp_path / "bars.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(BarsImportError) as caught:
        import_path(clean_db, tmp_path / "bars.csv", timeframe="5m")
    assert [str(p) for p in caught.value.problems] == [
        f"{tmp_path}/bars.csv, line 6, timestamp: timestamp 'yesterday' is not an ISO 8601 timestamp"
    ]
    lines[5] = "AAA,2024-01-02T14:45:00Z,1,2,0.5,1.5,10"
    (tmp_path / "bars.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(BarsImportError) as caught:
        import_path(clean_db, tmp_path / "bars.csv", timeframe="5m")
    assert [str(p) for p in caught.value.problems] == [
        f"{tmp_path}/bars.csv, line 4, timestamp: AAA at 2024-01-02T14:37:00Z is less than a 5m bar after the bar "
        "before it",
        f"{tmp_path}/bars.csv, line 5, timestamp: duplicate bar for AAA on 2024-01-02T14:35:00Z",
    ]
    with pytest.raises(BarsImportError, match="a date column holds daily bars, not 1h ones"):
        (tmp_path / "d.parquet").write_bytes(b"")
        pq.write_table(_table("AAA", BARS["AAPL"]), tmp_path / "d.parquet")
        import_path(clean_db, tmp_path / "d.parquet", timeframe="1h")
    assert stored_rows(clean_db) == []


def test_progress_bars_show_files_read_and_bars_written(
    clean_db: Engine, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pq.write_table(_table(None, BARS["AAPL"]), tmp_path / "AAPL.parquet")
    import_path(clean_db, tmp_path / "AAPL.parquet", progress=True)  # one file: the bars it writes
    assert "writing" in capsys.readouterr().err
    pq.write_table(_table(None, BARS["BRK.B"]), tmp_path / "BRK.B.parquet")
    import_path(clean_db, tmp_path, progress=True)  # a folder: its files
    shown = capsys.readouterr().err
    assert "importing" in shown and "2/2" in shown
    import_path(clean_db, tmp_path, progress=False)
    assert capsys.readouterr().err == ""
