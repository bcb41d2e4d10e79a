"""The bars CSV importer against a real PostgreSQL: exact round-trip, idempotence, all-or-nothing."""

from __future__ import annotations

import io
from datetime import date
from pathlib import Path
from typing import Any

import psycopg2
import pytest
from sqlalchemy import Engine, text

from shared.marketdata import store
from shared.marketdata.csv_import import BAR_COLUMNS, BarsImportError, import_csv, import_csv_file
from shared.marketdata.series import DEFAULT_TIMEFRAME, day_ts
from shared.marketdata.store import SymbolInfo
from tests.helpers import stored_rows

HEADER = ",".join(BAR_COLUMNS)

# Values chosen to catch any lossy float formatting on the way into double precision.
ROWS = [
    ("AAPL", "2024-01-02", 0.1, 0.30000000000000004, 0.1, 0.2, 0),
    ("AAPL", "2024-01-03", 1 / 3, 2 / 3, 1 / 7, 0.5, 2**53),
    ("AAPL", "2024-01-04", 123456.789012345, 123456.78901234501, 1e-05, 99999.99999999999, 1200),
    ("BRK.B", "2024-01-02", 350.25, 352.0, 349.5, 351.75, 3_000_000),
    ("BRK.B", "2024-01-03", 5e-324 * 2**60, 1.7976931348623157e308, 5e-324 * 2**60, 5e-324 * 2**60, 1),
]


def _line(row: tuple[Any, ...]) -> str:
    """Floats as repr (their exact shortest spelling); str/int as themselves."""
    return ",".join(repr(v) if isinstance(v, float) else str(v) for v in row) + "\n"


def _csv(rows: list[tuple[Any, ...]], header: str = HEADER) -> str:
    return header + "\n" + "".join(_line(row) for row in rows)


def _import(engine: Engine, content: str, name: str = "bars.csv") -> Any:
    return import_csv(engine, io.StringIO(content, newline=""), source_name=name)


def _bars(engine: Engine) -> list[tuple[Any, ...]]:
    return stored_rows(engine)


def _symbols(engine: Engine) -> list[tuple[Any, ...]]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(text("SELECT symbol, name, is_synthetic FROM symbols ORDER BY 1"))]


def _expected(rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    return sorted((s, date.fromisoformat(d), o, h, lo, c, v) for s, d, o, h, lo, c, v in rows)


def test_good_file_round_trips_exactly(clean_db: Engine) -> None:
    report = _import(clean_db, _csv(ROWS))
    assert (report.rows, report.symbols, report.inserted, report.updated, report.unchanged) == (5, 2, 5, 0, 0)
    assert report.seconds >= 0
    stored = _bars(clean_db)
    assert stored == _expected(ROWS)
    for row in stored:  # equality above is float ==; make the bit-exactness explicit
        assert all(type(v) is float for v in row[2:6])
    assert _symbols(clean_db) == [("AAPL", None, False), ("BRK.B", None, False)]


def test_reimport_of_the_same_file_changes_nothing(clean_db: Engine) -> None:
    content = _csv(ROWS)
    _import(clean_db, content)
    before = _bars(clean_db)
    report = _import(clean_db, content)
    assert (report.rows, report.inserted, report.updated, report.unchanged) == (5, 0, 0, 5)
    assert _bars(clean_db) == before
    assert len(_symbols(clean_db)) == 2


def test_corrected_file_updates_changed_rows_and_adds_new_ones(clean_db: Engine) -> None:
    _import(clean_db, _csv(ROWS))
    corrected = [*ROWS]
    corrected[3] = ("BRK.B", "2024-01-02", 350.25, 353.5, 349.5, 352.125, 3_100_000)
    corrected.append(("MSFT", "2024-01-02", 370.0, 372.0, 369.0, 371.0, 20_000_000))
    report = _import(clean_db, _csv(corrected))
    assert (report.rows, report.symbols, report.inserted, report.updated, report.unchanged) == (6, 3, 1, 1, 4)
    assert _bars(clean_db) == _expected(corrected)


def test_one_bad_row_loads_nothing(clean_db: Engine) -> None:
    rows = [*ROWS[:2], ("AAPL", "2024-01-05", 10.0, 9.0, 8.0, 9.5, 100), *ROWS[2:]]  # line 4: open above high
    with pytest.raises(BarsImportError) as info:
        _import(clean_db, _csv(rows), name="upload.csv")
    assert [(p.line, p.field) for p in info.value.problems] == [(4, "high")]
    assert "upload.csv: 1 problem, nothing was imported" in str(info.value)
    assert "line 4, high" in str(info.value)
    assert _bars(clean_db) == []
    assert _symbols(clean_db) == []


def test_bad_file_leaves_existing_data_untouched(clean_db: Engine) -> None:
    _import(clean_db, _csv(ROWS))
    before = _bars(clean_db)
    changed = [(s, d, o * 2, h * 2, lo * 2, c * 2, v) for s, d, o, h, lo, c, v in ROWS[:4]]
    bad = [*changed, ("NEW", "2024-01-02", 1.0, 1.0, 1.0, 1.0, -1)]
    with pytest.raises(BarsImportError):
        _import(clean_db, _csv(bad))
    assert _bars(clean_db) == before
    assert [s[0] for s in _symbols(clean_db)] == ["AAPL", "BRK.B"]


def test_duplicate_rows_are_rejected_with_both_lines(clean_db: Engine) -> None:
    with pytest.raises(BarsImportError) as info:
        _import(clean_db, _csv([*ROWS, ROWS[1]]))
    assert [(p.line, p.field) for p in info.value.problems] == [(7, "date")]
    assert "first on line 3" in info.value.problems[0].message
    assert _bars(clean_db) == []


def test_header_only_file_imports_nothing(clean_db: Engine) -> None:
    report = _import(clean_db, HEADER + "\n")
    assert (report.rows, report.symbols, report.inserted, report.updated) == (0, 0, 0, 0)


def test_import_file_with_bom_and_reordered_columns(clean_db: Engine, tmp_path: Path) -> None:
    path = tmp_path / "bars.csv"
    path.write_text(
        "\ufeffDate,Symbol,Volume,Close,Low,High,Open\r\n2024-01-02,msft,1500.0,371,369,372,370\r\n", encoding="utf-8"
    )
    report = import_csv_file(clean_db, path)
    assert report.source_name == str(path)
    assert (report.rows, report.inserted) == (1, 1)
    assert _bars(clean_db) == [("MSFT", date(2024, 1, 2), 370.0, 372.0, 369.0, 371.0, 1500)]


def test_import_file_reports_bad_encoding_on_its_line(clean_db: Engine, tmp_path: Path) -> None:
    # Enough good rows before the bad byte that it sits well past the decoder's first 8 KB chunk.
    good = "".join(f"AAPL,{date.fromordinal(737425 + i).isoformat()},10,12,9,11,1000\n" for i in range(500))
    path = tmp_path / "latin1.csv"
    path.write_bytes(f"{HEADER}\n{good}CAF\xc9,2024-01-02,10,12,9,11,1000\n".encode("latin-1"))
    with pytest.raises(BarsImportError) as info:
        import_csv_file(clean_db, path)
    assert [(p.line, p.field) for p in info.value.problems] == [(502, "symbol")]
    assert "not valid UTF-8" in info.value.problems[0].message
    assert _bars(clean_db) == []


def _one_bar(day: date = date(2024, 1, 2)) -> store.Columns:
    return store.columns_of([day_ts(day)], [10.0], [12.0], [9.0], [11.0], [1000.0])


def test_upsert_is_one_transaction(clean_db: Engine) -> None:
    """A failure inside the load (here: a symbol the database rejects) rolls back the symbol upsert too."""
    incoming = {"AAPL": _one_bar(), "X" * 40: _one_bar()}
    with pytest.raises(psycopg2.DataError):
        store.import_columns(clean_db, DEFAULT_TIMEFRAME, incoming, symbols=[SymbolInfo("AAPL", "Apple", False)])
    assert _symbols(clean_db) == []
    assert _bars(clean_db) == []
    # The pooled connection is healthy afterwards.
    report = _import(clean_db, _csv(ROWS))
    assert report.inserted == len(ROWS)


def test_symbol_info_is_upserted(clean_db: Engine) -> None:
    info = SymbolInfo("SYN0001", "Synthetic 0001 (seed 1)", True)
    counts = store.import_columns(clean_db, DEFAULT_TIMEFRAME, {"SYN0001": _one_bar()}, symbols=[info])
    assert (counts.inserted, counts.updated) == (1, 0)
    assert _symbols(clean_db) == [("SYN0001", "Synthetic 0001 (seed 1)", True)]
