"""Row, header and whole-file validation of the bars CSV importer (pure: no database)."""

from __future__ import annotations

import io
import pickle
from datetime import date

import numpy as np
import pytest

from shared.marketdata.csv_import import (
    BAR_COLUMNS,
    MAX_KEPT_PROBLEMS,
    SUMMARY_PROBLEMS,
    BarRow,
    BarsImportError,
    RowProblem,
    parse_header,
    parse_volume,
    validate_csv,
    validate_row,
)

HEADER = ",".join(BAR_COLUMNS)
GOOD = ["AAPL", "2024-01-02", "10", "12", "9", "11", "1000"]


def _row(**changes: str) -> list[str]:
    fields = dict(zip(BAR_COLUMNS, GOOD, strict=True))
    fields.update(changes)
    return [fields[column] for column in BAR_COLUMNS]


def _validate(text: str) -> tuple[int, dict[str, list[tuple[object, ...]]]]:
    """(valid rows, each symbol's bars as (date, open, high, low, close, volume) tuples in date order)."""
    validated = validate_csv(io.StringIO(text, newline=""), source_name="test.csv")
    bars = {
        symbol: list(zip(np.datetime_as_string((c.ts // 86_400).astype("datetime64[D]")).tolist(), c.open.tolist(),
                         c.high.tolist(), c.low.tolist(), c.close.tolist(), c.volume.tolist(), strict=True))
        for symbol, c in validated.columns.items()
    }  # fmt: skip
    return validated.rows, bars


def _problems(text: str) -> list[RowProblem]:
    with pytest.raises(BarsImportError) as info:
        _validate(text)
    return info.value.problems


# -- header -----------------------------------------------------------------------------------------


def test_header_canonical_order_is_identity() -> None:
    assert parse_header(list(BAR_COLUMNS)) == (0, 1, 2, 3, 4, 5, 6)


def test_header_any_order_any_case_and_bom() -> None:
    layout = parse_header(["\ufeffVolume", " Close ", "low", "HIGH", "open", "date", "symbol"])
    assert layout == (6, 5, 4, 3, 2, 1, 0)


@pytest.mark.parametrize(
    ("header", "fragment"),
    [
        (["symbol", "date", "open", "high", "low", "close"], "missing column(s) volume"),
        ([*BAR_COLUMNS, "adj_close"], "unexpected column(s) 'adj_close'"),
        (["symbol", "date", "open", "high", "low", "close", "close"], "repeated column(s) close"),
        (GOOD, "missing column(s) symbol, date"),  # a data row where the header should be
    ],
)
def test_header_problems(header: list[str], fragment: str) -> None:
    with pytest.raises(ValueError, match="header must name exactly") as info:
        parse_header(header)
    assert fragment in str(info.value)


# -- single rows ------------------------------------------------------------------------------------


def test_good_row_is_normalised() -> None:
    row = validate_row([" brk.b ", " 2024-01-02 ", "10.5", "12", "9.25", "11", "1200.0"], 7)
    assert row == BarRow("BRK.B", date(2024, 1, 2), 10.5, 12.0, 9.25, 11.0, 1200)
    assert isinstance(row, BarRow) and type(row.volume) is int


def test_row_uses_layout() -> None:
    fields = list(reversed(GOOD))  # volume,close,low,high,open,date,symbol
    assert validate_row(fields, 2, (6, 5, 4, 3, 2, 1, 0)) == BarRow("AAPL", date(2024, 1, 2), 10, 12, 9, 11, 1000)


@pytest.mark.parametrize(
    ("changes", "field", "fragment"),
    [
        ({"symbol": ""}, "symbol", "symbol is empty"),
        ({"symbol": "   "}, "symbol", "symbol is empty"),
        ({"symbol": "AB CD"}, "symbol", "invalid symbol"),
        ({"symbol": "^GSPC"}, "symbol", "invalid symbol"),  # must start with a letter or digit
        ({"symbol": "A" * 33}, "symbol", "invalid symbol"),
        ({"symbol": "ÄPPL"}, "symbol", "invalid symbol"),
        ({"symbol": "CAF\ufffd"}, "symbol", "not valid UTF-8"),  # what import_csv_file makes of a bad byte
        ({"date": "2024/01/02"}, "date", "is not YYYY-MM-DD"),
        ({"date": "20240102"}, "date", "is not YYYY-MM-DD"),
        ({"date": "2024-W01-2"}, "date", "is not YYYY-MM-DD"),
        ({"date": "2024-02-30"}, "date", "is not a calendar date"),
        ({"date": ""}, "date", "is not YYYY-MM-DD"),
        ({"open": "abc"}, "open", "is not a number"),
        ({"open": ""}, "open", "open is empty"),
        ({"open": "1_0"}, "open", "is not a number"),
        ({"open": "\u0661\u0660"}, "open", "is not a number"),  # Arabic-Indic "10": float() takes it, we do not
        ({"close": "nan"}, "close", "must be finite"),
        ({"high": "inf"}, "high", "must be finite"),
        ({"low": "-1"}, "low", "must be > 0"),
        ({"low": "0"}, "low", "must be > 0"),
        ({"high": "10.5"}, "high", "is below max(open, close, low)"),
        ({"high": "8.5", "low": "8"}, "high", "is below max(open, close, low)"),
        ({"low": "10.5"}, "low", "is above min(open, close)"),
        ({"volume": "12.5"}, "volume", "whole number"),
        ({"volume": "-5"}, "volume", "must be >= 0"),
        ({"volume": "many"}, "volume", "is not a number"),
        ({"volume": ""}, "volume", "volume is empty"),
        ({"volume": "1e300"}, "volume", "too large"),
        ({"volume": str(2**63)}, "volume", "too large"),
    ],
)
def test_bad_field_gives_line_and_field(changes: dict[str, str], field: str, fragment: str) -> None:
    result = validate_row(_row(**changes), 42)
    assert isinstance(result, list)
    assert [(p.line, p.field) for p in result] == [(42, field)]
    assert fragment in result[0].message


@pytest.mark.parametrize("count", [0, 1, 6, 8])
def test_wrong_column_count(count: int) -> None:
    result = validate_row(["x"] * count, 5)
    assert result == [RowProblem(5, None, f"expected 7 columns, got {count}")]


def test_every_bad_field_of_a_row_is_reported() -> None:
    result = validate_row(["", "2024-13-01", "x", "12", "9", "11", "1.5"], 3)
    assert isinstance(result, list)
    assert [p.field for p in result] == ["symbol", "date", "open", "volume"]


def test_envelope_check_has_tiny_relative_tolerance() -> None:
    assert isinstance(validate_row(_row(high=repr(11 * (1 - 1e-12))), 2), BarRow)
    assert isinstance(validate_row(_row(low=repr(10 * (1 + 1e-12))), 2), BarRow)
    assert isinstance(validate_row(_row(high=repr(11 * (1 - 1e-6))), 2), list)


@pytest.mark.parametrize(("text", "value"), [("0", 0), ("1200", 1200), ("1200.0", 1200), ("1e3", 1000), (" 7 ", 7)])
def test_volume_accepts_integral_spellings(text: str, value: int) -> None:
    assert parse_volume(text) == value


# -- whole files ------------------------------------------------------------------------------------


def test_valid_file_gives_each_symbols_columns_in_date_order() -> None:
    text = (
        f"{HEADER}\naapl,2024-01-03,10,12,9,11,1000.0\nMSFT,2024-01-02,0.1,0.30000000000000004,0.1,0.2,0\n"
        "AAPL,2024-01-02,1,2,0.5,1.5,7\n"
    )
    assert _validate(text) == (3, {
        "AAPL": [("2024-01-02", 1.0, 2.0, 0.5, 1.5, 7.0), ("2024-01-03", 10.0, 12.0, 9.0, 11.0, 1000.0)],
        "MSFT": [("2024-01-02", 0.1, 0.30000000000000004, 0.1, 0.2, 0.0)],
    })  # fmt: skip


def test_header_only_file_is_empty_but_valid() -> None:
    assert _validate(HEADER + "\n") == (0, {})


def test_empty_file_needs_a_header() -> None:
    assert _problems("") == [RowProblem(1, None, "empty first line: a header row is required")]


def test_missing_header_is_a_line_1_problem() -> None:
    problems = _problems("AAPL,2024-01-02,10,12,9,11,1000\n")
    assert [(p.line, p.field) for p in problems] == [(1, None)]
    assert "missing column(s)" in problems[0].message


def test_line_numbers_count_physical_lines() -> None:
    text = (
        f"{HEADER}\n"  # 1
        "AAPL,2024-01-02,10,12,9,11,1000\n"  # 2
        "\n"  # 3: blank lines are skipped but counted
        'AAPL,2024-01-03,10,12,9,11,"10\n00"\n'  # 4-5: a quoted field spanning two lines
        "AAPL,2024-01-04,10,8,9,11,1000\n"  # 6: high too low
        "AAPL,2024-01-05,10,12,9,11\n"  # 7: six columns
    )
    problems = _problems(text)
    assert [(p.line, p.field) for p in problems] == [(4, "volume"), (6, "high"), (7, None)]


def test_duplicates_name_both_lines() -> None:
    text = (
        f"{HEADER}\n"
        "AAPL,2024-01-02,10,12,9,11,1000\n"  # 2
        "MSFT,2024-01-02,10,12,9,11,1000\n"  # 3
        "aapl,2024-01-02,10,12,9,11,1000\n"  # 4: same key after upper-casing
        "AAPL,2024-01-03,10,12,9,11,1000\n"  # 5
        "AAPL, 2024-01-02 ,10,12,9,11,1000\n"  # 6: third copy
    )
    problems = _problems(text)
    assert [(p.line, p.field) for p in problems] == [(4, "date"), (6, "date")]
    assert all("duplicate bar for AAPL on 2024-01-02 (first on line 2)" in p.message for p in problems)


@pytest.mark.parametrize("bad_line", ['AAPL,2024-01-03,"10"x,12,9,11,1000\n', 'AAPL,2024-01-03,"10,12,9,11,1000\n'])
def test_broken_quoting_is_reported_and_stops_reading(bad_line: str) -> None:
    problems = _problems(f"{HEADER}\nAAPL,2024-01-02,10,12,9,11,1000\n{bad_line}AAPL,2024-01-04,10,12,9,11,x\n")
    assert [(p.line, p.field) for p in problems] == [(3, None)]
    assert "unreadable CSV" in problems[0].message


def test_problems_are_in_line_order_and_duplicates_merge_in() -> None:
    text = f"{HEADER}\nAAPL,2024-01-02,10,12,9,11,1000\nAAPL,2024-01-02,10,12,9,11,1000\nAAPL,bad,10,12,9,11,1\n"
    assert [p.line for p in _problems(text)] == [3, 4]


def test_error_summary_shows_first_problems_and_counts_the_rest() -> None:
    bad_rows = "".join(f"AAPL,2024-01-02,10,12,9,11,{-i}\n" for i in range(1, 61))
    with pytest.raises(BarsImportError) as info:
        _validate(f"{HEADER}\n{bad_rows}")
    error = info.value
    assert error.total_problems == 60
    text = str(error)
    assert text.startswith("test.csv: 60 problems, nothing was imported")
    assert "line 2, volume: volume must be >= 0, got '-1'" in text
    assert f"line {SUMMARY_PROBLEMS + 1}, volume" in text
    assert f"line {SUMMARY_PROBLEMS + 2}, volume" not in text
    assert text.endswith(f"... and {60 - SUMMARY_PROBLEMS} more")


def test_kept_problems_are_bounded_but_counted() -> None:
    count = MAX_KEPT_PROBLEMS + 500
    bad_rows = "".join(f"AAPL,2024-01-02,10,12,9,11,x{i}\n" for i in range(count))
    with pytest.raises(BarsImportError) as info:
        _validate(f"{HEADER}\n{bad_rows}")
    assert info.value.total_problems == count
    assert len(info.value.problems) == MAX_KEPT_PROBLEMS
    assert info.value.problems[0].line == 2


def test_import_error_survives_pickling() -> None:
    error = BarsImportError("f.csv", [RowProblem(3, "high", "too low")], total_problems=7)
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.source_name, copy.problems, copy.total_problems, str(copy)) == ("f.csv", error.problems, 7, str(error))
