"""Daily-bar CSV import: validate every row first, then load all of it in one transaction, or nothing.

Why this shape:

* Validation runs in Python over the whole file *before* the database is touched, so a file with a
  bad row is rejected with every problem and its line number, and the store is never half-loaded.
* Valid rows are gathered as columns (``array('d')``, 48 bytes a row) and sorted per symbol in numpy;
  :func:`shared.marketdata.store.import_columns` lays them over the stored series by date in one
  transaction, so loading the same file twice changes nothing and a corrected file updates exactly the
  bars that changed (and the data version of exactly the symbols it changed).
"""

from __future__ import annotations

import csv
import functools
import math
import re
import time
from array import array
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import NamedTuple, TextIO, TypeVar

import numpy as np
from sqlalchemy import Engine

from shared.marketdata import store
from shared.marketdata.series import DEFAULT_TIMEFRAME, SECONDS_PER_DAY, SYMBOL_PATTERN, Columns, by_symbol

# The CSV columns, in the order validation reads them.
BAR_COLUMNS: tuple[str, ...] = ("symbol", "date", "open", "high", "low", "close", "volume")
PRICE_COLUMNS: tuple[str, ...] = ("open", "high", "low", "close")
CANONICAL_LAYOUT: tuple[int, ...] = tuple(range(len(BAR_COLUMNS)))

_DATE_PATTERN = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")

# Relative slack for the high/low envelope checks: absorbs float noise from upstream rounding.
OHLC_TOLERANCE = 1e-9
# Volumes are stored as float64 beside the prices: exact for whole numbers up to 2**53.
_MAX_VOLUME = 2**53

_T = TypeVar("_T")
# What undecodable input bytes become (see import_csv_file).
_REPLACEMENT_CHAR = "\ufffd"

# Problems shown by str(BarsImportError) / kept on the exception. The count of all of them is always exact.
SUMMARY_PROBLEMS = 50
MAX_KEPT_PROBLEMS = 1000

ORDINAL_1970 = date(1970, 1, 1).toordinal()


# --------------------------------------------------------------------------------------------------
# Problems and reports
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RowProblem:
    """One reason a file is rejected. ``line`` counts physical lines of the file, header = 1."""

    line: int
    field: str | None
    message: str
    source: str | None = None  # the file, when an import reads several
    unit: str = "line"  # what ``line`` counts: "line" (CSV), "row" (Parquet, 1-based), "file" (the file as a whole)

    def __str__(self) -> str:
        place = [self.source] if self.source else []
        place += [f"{self.unit} {self.line}"] if self.unit != "file" else []
        place += [self.field] if self.field else []
        return f"{', '.join(place)}: {self.message}"


class BarsImportError(Exception):
    """The file is not acceptable; nothing was loaded.

    ``problems`` holds the first :data:`MAX_KEPT_PROBLEMS` problems in line order (a file of a
    million bad rows must not cost a million objects); ``total_problems`` counts all of them.
    """

    def __init__(self, source_name: str, problems: Sequence[RowProblem], total_problems: int | None = None) -> None:
        self.source_name = source_name
        self.problems: list[RowProblem] = list(problems)
        self.total_problems = len(self.problems) if total_problems is None else total_problems
        super().__init__(self._summary())

    def __reduce__(self) -> tuple[type[BarsImportError], tuple[str, list[RowProblem], int]]:
        """Picklable (Celery results, multiprocessing) although ``__init__`` does not take the message."""
        return (type(self), (self.source_name, self.problems, self.total_problems))

    def _summary(self) -> str:
        count = self.total_problems
        head = f"{self.source_name}: {count} problem{'s' if count != 1 else ''}, nothing was imported"
        shown = self.problems[:SUMMARY_PROBLEMS]
        lines = [head, *(f"  {problem}" for problem in shown)]
        if count > len(shown):
            lines.append(f"  ... and {count - len(shown)} more")
        return "\n".join(lines)


@dataclass(frozen=True)
class ImportReport:
    """What an import did. ``updated`` counts only rows whose values actually changed."""

    source_name: str
    rows: int
    symbols: int
    inserted: int
    updated: int
    seconds: float

    @property
    def unchanged(self) -> int:
        return self.rows - self.inserted - self.updated


@dataclass(frozen=True)
class Validated:
    """A valid file's bars: how many rows, and each symbol's columns in date order."""

    rows: int
    columns: dict[str, Columns]


class BarRow(NamedTuple):
    """One validated, normalised row."""

    symbol: str
    date: date
    open: float
    high: float
    low: float
    close: float
    volume: int


# --------------------------------------------------------------------------------------------------
# Field parsers: pure, each raises ValueError with a message meant for the user
# --------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=16384)
def parse_symbol(raw: str) -> str:
    """Strip and upper-case; cached because a file repeats each symbol thousands of times."""
    symbol = raw.strip().upper()
    if not symbol:
        raise ValueError("symbol is empty")
    if not symbol.isascii() or SYMBOL_PATTERN.fullmatch(symbol) is None:
        if _REPLACEMENT_CHAR in symbol:
            raise ValueError(f"symbol {raw.strip()!r} contains bytes that are not valid UTF-8")
        raise ValueError(f"invalid symbol {raw.strip()!r} (letters, digits and . - ^ = _, at most 32)")
    return symbol


@functools.lru_cache(maxsize=16384)
def parse_date(raw: str) -> date:
    """Strict ``YYYY-MM-DD`` only: ``date.fromisoformat`` alone would also take ``20250102`` and week dates."""
    text = raw.strip()
    if _DATE_PATTERN.fullmatch(text) is None:
        raise ValueError(f"date {text!r} is not YYYY-MM-DD")
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise ValueError(f"date {text!r} is not a calendar date") from None


def _plain_number_text(raw: str, name: str) -> str:
    """Reject what Python's number parsers take but a CSV should not contain (``1_000``, non-ASCII digits)."""
    text = raw.strip()
    if not text:
        raise ValueError(f"{name} is empty")
    if not text.isascii() or "_" in text:
        raise ValueError(f"{name} {text!r} is not a number")
    return text


def parse_price(raw: str, name: str = "price") -> float:
    """A finite float > 0.

    The common case is one ``float()`` and three cheap checks (this runs 5M times for a large file);
    only a value that fails them pays for working out the precise message.
    """
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if 0.0 < value < math.inf and raw.isascii() and "_" not in raw:
        return value
    text = _plain_number_text(raw, name)
    if math.isnan(value) and text.lower() not in ("nan", "+nan", "-nan"):
        raise ValueError(f"{name} {text!r} is not a number")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {text!r}")
    raise ValueError(f"{name} must be > 0, got {text!r}")


def parse_volume(raw: str) -> int:
    """A non-negative integer; ``1200.0`` is accepted (spreadsheets write it), ``12.5`` is not."""
    text = _plain_number_text(raw, "volume")
    try:
        value = int(text)
    except ValueError:
        try:
            as_float = float(text)
        except ValueError:
            raise ValueError(f"volume {text!r} is not a number") from None
        if not math.isfinite(as_float) or not as_float.is_integer():
            raise ValueError(f"volume must be a whole number, got {text!r}") from None
        if abs(as_float) >= _MAX_VOLUME:
            raise ValueError(f"volume {text!r} is too large to be exact; write it as an integer") from None
        value = int(as_float)
    if value < 0:
        raise ValueError(f"volume must be >= 0, got {text!r}")
    if value > _MAX_VOLUME:
        raise ValueError(f"volume {text!r} is too large (at most 2**53, what a float64 holds exactly)")
    return value


def ohlc_problem(open_: float, high: float, low: float, close: float) -> tuple[str, str] | None:
    """The (field, message) of an inconsistent bar, or None. High must enclose everything, low the body."""
    top = max(open_, close, low)
    if high < top - OHLC_TOLERANCE * top:
        return "high", f"high {high!r} is below max(open, close, low) = {top!r}"
    bottom = min(open_, close)
    if low > bottom + OHLC_TOLERANCE * bottom:
        return "low", f"low {low!r} is above min(open, close) = {bottom!r}"
    return None


# --------------------------------------------------------------------------------------------------
# Header and row validation
# --------------------------------------------------------------------------------------------------


def parse_header(fields: Sequence[str]) -> tuple[int, ...]:
    """Indices of :data:`BAR_COLUMNS` in the file. Any order; names are case-insensitive; no extras.

    Raises ``ValueError`` naming what is missing, unknown or repeated.
    """
    names = [name.strip().lstrip("\ufeff").strip().lower() for name in fields]
    problems: list[str] = []
    missing = [column for column in BAR_COLUMNS if column not in names]
    if missing:
        problems.append(f"missing column(s) {', '.join(missing)}")
    extra = [name for name in names if name not in BAR_COLUMNS]
    if extra:
        problems.append(f"unexpected column(s) {', '.join(repr(name) for name in extra)}")
    repeated = sorted({name for name in names if name in BAR_COLUMNS and names.count(name) > 1})
    if repeated:
        problems.append(f"repeated column(s) {', '.join(repeated)}")
    if problems:
        expected = ",".join(BAR_COLUMNS)
        raise ValueError(f"header must name exactly the columns {expected} (any order): " + "; ".join(problems))
    return tuple(names.index(column) for column in BAR_COLUMNS)


def validate_row(
    fields: Sequence[str], line: int, layout: Sequence[int] = CANONICAL_LAYOUT
) -> BarRow | list[RowProblem]:
    """Validate one data row; ``layout`` comes from :func:`parse_header`.

    Returns the normalised row, or every problem found (one per bad field, so the user fixes a
    row in one go). Good rows take a straight-line path; a failing row is re-examined field by field.
    """
    if len(fields) != len(BAR_COLUMNS):
        return [RowProblem(line, None, f"expected {len(BAR_COLUMNS)} columns, got {len(fields)}")]
    try:
        row = BarRow(
            parse_symbol(fields[layout[0]]),
            parse_date(fields[layout[1]]),
            parse_price(fields[layout[2]], "open"),
            parse_price(fields[layout[3]], "high"),
            parse_price(fields[layout[4]], "low"),
            parse_price(fields[layout[5]], "close"),
            parse_volume(fields[layout[6]]),
        )
    except ValueError:
        return _row_problems(fields, line, layout)
    envelope = ohlc_problem(row.open, row.high, row.low, row.close)
    if envelope is not None:
        return [RowProblem(line, envelope[0], envelope[1])]
    return row


def _row_problems(fields: Sequence[str], line: int, layout: Sequence[int]) -> list[RowProblem]:
    """Every field problem of a row known to be bad, plus the envelope check when all prices parsed."""
    problems: list[RowProblem] = []
    _field(parse_symbol, fields[layout[0]], line, "symbol", problems)
    _field(parse_date, fields[layout[1]], line, "date", problems)
    prices = [
        _field(functools.partial(parse_price, name=name), fields[layout[2 + i]], line, name, problems)
        for i, name in enumerate(PRICE_COLUMNS)
    ]
    _field(parse_volume, fields[layout[6]], line, "volume", problems)
    open_, high, low, close = prices
    if open_ is not None and high is not None and low is not None and close is not None:
        envelope = ohlc_problem(open_, high, low, close)
        if envelope is not None:
            problems.append(RowProblem(line, envelope[0], envelope[1]))
    return problems


def _field(parse: Callable[[str], _T], raw: str, line: int, name: str, problems: list[RowProblem]) -> _T | None:
    try:
        return parse(raw)
    except ValueError as exc:
        problems.append(RowProblem(line, name, str(exc)))
        return None


class _ProblemLog:
    """Collects problems with an exact total but a bounded list."""

    def __init__(self) -> None:
        self.kept: list[RowProblem] = []
        self.total = 0

    def add(self, problems: Iterable[RowProblem]) -> None:
        for problem in problems:
            self.total += 1
            if len(self.kept) < MAX_KEPT_PROBLEMS:
                self.kept.append(problem)


def validate_csv(stream: TextIO, *, source_name: str) -> Validated:
    """Validate a whole CSV stream; return its bars as columns per symbol.

    Raises :class:`BarsImportError` listing the problems (line order) if any row is bad. The stream
    should be opened with ``newline=""`` so quoted fields and line counting follow the csv module.
    """
    reader = csv.reader(stream, strict=True)
    log = _ProblemLog()
    try:
        header = next(reader, None)
    except (csv.Error, UnicodeDecodeError) as exc:
        raise BarsImportError(source_name, [RowProblem(1, None, f"unreadable header: {exc}")]) from None
    if header is None or not header:
        raise BarsImportError(source_name, [RowProblem(1, None, "empty first line: a header row is required")])
    try:
        layout = parse_header(header)
    except ValueError as exc:
        raise BarsImportError(source_name, [RowProblem(1, None, str(exc))]) from None

    symbol_ids: dict[str, int] = {}
    keys = array("q")  # symbol id << 32 | date ordinal, per valid row: duplicate detection in numpy
    key_lines = array("q")
    values = [array("d") for _ in range(5)]  # open, high, low, close, volume of each valid row
    rows = 0
    next_line = reader.line_num + 1
    while True:
        line = next_line
        try:
            fields = next(reader)
        except StopIteration:
            break
        except (csv.Error, UnicodeDecodeError) as exc:
            # The csv module cannot resynchronise after a broken quote or bad bytes: stop here.
            log.add([RowProblem(line, None, f"unreadable CSV: {exc}")])
            break
        next_line = reader.line_num + 1
        if not fields:  # a blank line (e.g. a trailing newline at the end of the file)
            continue
        result = validate_row(fields, line, layout)
        if isinstance(result, list):
            log.add(result)
            continue
        rows += 1
        symbol_id = symbol_ids.setdefault(result.symbol, len(symbol_ids))
        keys.append((symbol_id << 32) | result.date.toordinal())
        key_lines.append(line)
        if log.total == 0:
            for column, value in zip(values, result[2:], strict=True):
                column.append(value)

    log.add(duplicate_problems(keys, key_lines, symbol_ids))
    if log.total:
        log.kept.sort(key=lambda problem: problem.line)
        raise BarsImportError(source_name, log.kept, total_problems=log.total)
    return Validated(rows, columns_by_symbol(keys, values, symbol_ids))


def columns_by_symbol(keys: array[int], values: list[array[float]], symbol_ids: dict[str, int]) -> dict[str, Columns]:
    """Valid rows (``symbol id << 32 | date ordinal`` keys, no key twice) as each symbol's columns, by date."""
    key_arr = np.frombuffer(keys, dtype=np.int64)
    names = sorted(symbol_ids, key=symbol_ids.__getitem__)
    stacked = np.stack([np.frombuffer(column, dtype=np.float64) for column in values])
    return by_symbol(names, key_arr >> 32, ((key_arr & 0xFFFFFFFF) - ORDINAL_1970) * SECONDS_PER_DAY, stacked)


def duplicate_problems(keys: array[int], lines: array[int], symbol_ids: dict[str, int]) -> list[RowProblem]:
    """One problem per repeated ``(symbol, date)``, naming the line it repeats.

    Sorting 1.26M int64 keys in numpy is milliseconds and ~20 MB, where a Python set of tuples would
    be ~150 MB; the stable sort keeps each group's first occurrence first.
    """
    if len(keys) < 2:
        return []
    key_arr = np.frombuffer(keys, dtype=np.int64)
    line_arr = np.frombuffer(lines, dtype=np.int64)
    order = np.argsort(key_arr, kind="stable")
    sorted_keys = key_arr[order]
    repeats = np.flatnonzero(sorted_keys[1:] == sorted_keys[:-1]) + 1
    if repeats.size == 0:
        return []
    # Position of each group's first row: the last index <= i where a new key starts.
    starts = np.ones(len(sorted_keys), dtype=bool)
    starts[1:] = sorted_keys[1:] != sorted_keys[:-1]
    group_first = np.maximum.accumulate(np.where(starts, np.arange(len(sorted_keys)), 0))
    symbols_by_id = {symbol_id: symbol for symbol, symbol_id in symbol_ids.items()}
    problems = []
    for position in repeats.tolist():
        key = int(sorted_keys[position])
        symbol = symbols_by_id[key >> 32]
        day = date.fromordinal(key & 0xFFFFFFFF)
        first_line = int(line_arr[order[group_first[position]]])
        problems.append(
            RowProblem(
                int(line_arr[order[position]]),
                "date",
                f"duplicate bar for {symbol} on {day.isoformat()} (first on line {first_line})",
            )
        )
    return problems


# --------------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------------


def import_csv(engine: Engine, stream: TextIO, *, source_name: str, exchange_tz: str | None = None) -> ImportReport:
    """Validate the whole stream, then load it atomically. Raises :class:`BarsImportError` (nothing loaded).
    ``exchange_tz``: the symbols' exchange time zone, set with the bars."""
    started = time.perf_counter()
    validated = validate_csv(stream, source_name=source_name)
    counts = (
        store.import_columns(engine, DEFAULT_TIMEFRAME, validated.columns, exchange_tz=exchange_tz)
        if validated.rows
        else None
    )
    return ImportReport(
        source_name=source_name,
        rows=validated.rows,
        symbols=len(validated.columns),
        inserted=counts.inserted if counts else 0,
        updated=counts.updated if counts else 0,
        seconds=time.perf_counter() - started,
    )


def import_csv_file(engine: Engine, path: Path, *, exchange_tz: str | None = None) -> ImportReport:
    """Import a UTF-8 CSV file (a leading byte-order mark, as Excel writes, is ignored).

    Undecodable bytes are replaced by U+FFFD rather than raised: a strict decoder fails per 8 KB chunk,
    losing the line, whereas every acceptable field is ASCII, so a replaced byte fails the very field it
    is in and is reported on its own line.
    """
    with path.open("r", encoding="utf-8-sig", errors="replace", newline="") as stream:
        return import_csv(engine, stream, source_name=str(path), exchange_tz=exchange_tz)
