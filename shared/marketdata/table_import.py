"""Importing bars from Parquet files and from folders of per-symbol files, validated as whole columns.

What it takes:

* a Parquet file with the CSV importer's columns (``symbol, date, open, high, low, close, volume``); without a
  ``symbol`` column it is one symbol's file, named ``SYMBOL.parquet``;
* a folder of per-symbol files, ``SYMBOL.csv`` or ``SYMBOL.parquet``, in the layout common downloaders write
  (``Date,Open,High,Low,Close,Adj Close,Volume``, any column case; ``Adj Close`` is not imported: adjustments are
  computed from corporate actions, not taken from a vendor's column).

Every value is checked in numpy over whole columns with the CSV importer's rules (prices finite and > 0, a whole
volume in [0, 2**53], high and low enclosing the body, one bar per symbol and date); a file's problems name the
file and its row (Parquet, 1-based) or line (CSV, header = 1). Nothing is loaded unless every file is good; then
everything goes into the store in one transaction (``store.import_columns``): idempotent, all or nothing.
"""

from __future__ import annotations

import csv
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from numpy.typing import NDArray
from sqlalchemy import Engine

from shared.marketdata import store
from shared.marketdata.bars import SYMBOL_PATTERN
from shared.marketdata.csv_import import (
    MAX_KEPT_PROBLEMS,
    OHLC_TOLERANCE,
    ORDINAL_1970,
    BarsImportError,
    ImportReport,
    RowProblem,
    import_csv_file,
    parse_date,
)
from shared.marketdata.series import DEFAULT_TIMEFRAME, Columns, by_symbol

VALUE_COLUMNS = ("open", "high", "low", "close", "volume")
IGNORED_COLUMNS = ("adj close", "adj_close", "adjclose")
MAX_VOLUME = 2**53
SUFFIXES = (".csv", ".parquet")


@dataclass(frozen=True)
class FileBars:
    """One file's valid bars, per symbol, and how many rows it had."""

    source: str
    rows: int
    columns: dict[str, Columns]


class _Problems:
    """A file's problems: all of them counted, the first :data:`MAX_KEPT_PROBLEMS` kept (in row order at the end)."""

    def __init__(self, source: str, unit: str, first: int) -> None:
        self.source, self.unit, self.first = source, unit, first  # ``first``: the number of the first data row
        self.kept: list[RowProblem] = []
        self.total = 0

    def add(self, rows: NDArray[np.int64] | Sequence[int], field: str | None, message: Any) -> None:
        """A problem at each of ``rows`` (0-based data rows); ``message`` is text, or a function of the row."""
        for row in rows[: max(0, MAX_KEPT_PROBLEMS - len(self.kept))]:
            text = message(int(row)) if callable(message) else message
            self.kept.append(RowProblem(int(row) + self.first, field, text, source=self.source, unit=self.unit))
        self.total += len(rows)

    def raise_if_any(self) -> None:
        if self.total:
            self.kept.sort(key=lambda p: p.line)
            raise BarsImportError(self.source, self.kept, total_problems=self.total)


def import_path(engine: Engine, path: Path) -> ImportReport:
    """Validate every file of ``path`` (a CSV or Parquet file, or a folder of per-symbol files), then load all of
    them in one transaction. Raises :class:`BarsImportError` naming every bad row of every file (nothing loaded).
    A CSV file with a ``symbol`` column goes to the CSV importer (shared.marketdata.csv_import)."""
    if path.is_file() and path.suffix.lower() == ".csv" and _has_symbol_column(path):
        return import_csv_file(engine, path)  # the CSV importer's own format: checked line by line, as before
    started = time.perf_counter()
    files = per_symbol_files(path) if path.is_dir() else [path]
    problems: list[RowProblem] = []
    total = 0
    parts: list[FileBars] = []
    for file in files:
        try:
            parts.append(read_file(file))
        except BarsImportError as exc:
            problems.extend(exc.problems)
            total += exc.total_problems
    merged, repeated = _merge(parts)
    problems.extend(repeated)
    total += len(repeated)
    if total:
        problems.sort(key=lambda p: (p.source or "", p.line))
        raise BarsImportError(str(path), problems[:MAX_KEPT_PROBLEMS], total_problems=total)
    rows = sum(p.rows for p in parts)
    counts = store.import_columns(engine, DEFAULT_TIMEFRAME, merged) if merged else None
    return ImportReport(
        source_name=str(path),
        rows=rows,
        symbols=len(merged),
        inserted=counts.inserted if counts else 0,
        updated=counts.updated if counts else 0,
        seconds=time.perf_counter() - started,
    )


def _has_symbol_column(file: Path) -> bool:
    with file.open(newline="", encoding="utf-8-sig", errors="replace") as stream:
        return "symbol" in {name.strip().lower() for name in next(csv.reader(stream), [])}


def per_symbol_files(folder: Path) -> list[Path]:
    """The folder's ``SYMBOL.csv`` / ``SYMBOL.parquet`` files, by name. Other files are a problem, not skipped: a
    ``prices.xlsx`` left out silently would be a symbol missing from the import."""
    files = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    strays = [p.name for p in files if p.suffix.lower() not in SUFFIXES or not p.is_file()]
    if strays:
        shown = ", ".join(strays[:5]) + (f" and {len(strays) - 5} more" if len(strays) > 5 else "")
        raise _whole(folder, f"not a SYMBOL.csv or SYMBOL.parquet file: {shown}")
    if not files:
        raise _whole(folder, "no SYMBOL.csv or SYMBOL.parquet files")
    return files


def _whole(path: Path, message: str) -> BarsImportError:
    """A problem with a file (or folder) as a whole: nothing of it is imported."""
    return BarsImportError(str(path), [RowProblem(0, None, message, source=str(path), unit="file")])


def _symbol_of(file: Path) -> str:
    return file.stem.strip().upper()


def read_file(file: Path) -> FileBars:
    """One file's bars, validated. A file without a ``symbol`` column holds one symbol's bars: its name's stem."""
    source = str(file)
    is_csv = file.suffix.lower() == ".csv"
    problems = _Problems(source, "line" if is_csv else "row", 2 if is_csv else 1)
    try:
        table = _read_table(file, is_csv)
    except (pa.ArrowInvalid, OSError) as exc:
        raise _whole(file, f"unreadable file: {exc}") from None
    names = {name.strip().lstrip("\ufeff").strip().lower(): name for name in table.column_names}
    symbol = None if "symbol" in names else _symbol_of(file)  # a file without a symbol column is SYMBOL.ext
    wanted = ["date", *VALUE_COLUMNS] + ([] if symbol is not None else ["symbol"])
    missing = [c for c in wanted if c not in names]
    extra = [n for n in names if n not in wanted and n not in IGNORED_COLUMNS]
    if missing or extra:
        parts = ([f"missing column(s) {', '.join(missing)}"] if missing else []) + (
            [f"unexpected column(s) {', '.join(repr(e) for e in extra)}"] if extra else []
        )
        raise _whole(file, f"columns must be {','.join(wanted)} (any order and case): {'; '.join(parts)}")
    n = table.num_rows
    if symbol is not None and SYMBOL_PATTERN.fullmatch(symbol) is None:
        raise _whole(file, f"file name {file.name!r} is not a symbol (letters, digits and . - ^ = _, at most 32)")
    if symbol is not None:
        symbols, codes = [symbol], np.zeros(n, dtype=np.int64)
    else:
        symbols, codes = _symbols(table[names["symbol"]], problems)
    days = _dates(table[names["date"]], problems)
    values = np.stack([_floats(table[names[c]], c, problems) for c in VALUE_COLUMNS]) if n else np.empty((5, 0))
    _check_values(values, problems)
    problems.raise_if_any()
    columns = _by_symbol(symbols, codes, days, values, problems)
    problems.raise_if_any()
    return FileBars(source, n, columns)


def _read_table(file: Path, is_csv: bool) -> pa.Table:
    if not is_csv:
        return pq.read_table(file)
    # Every column as text: a bad cell is then that cell's problem, not a type the whole column was inferred as.
    with file.open(newline="", encoding="utf-8-sig", errors="replace") as stream:
        header = next(csv.reader(stream), [])
    types = dict.fromkeys(header, pa.string())
    return pacsv.read_csv(file, convert_options=pacsv.ConvertOptions(column_types=types, strings_can_be_null=False))


def _symbols(column: pa.ChunkedArray, problems: _Problems) -> tuple[list[str], NDArray[np.int64]]:
    """The file's symbols (normalised: stripped, upper-case) and each row's index into them. Each distinct spelling
    is checked once, not each row."""
    encoded = pc.dictionary_encode(column.cast(pa.string())).combine_chunks()
    spellings = encoded.dictionary.to_pylist()
    codes = encoded.indices.to_numpy(zero_copy_only=False)
    names: list[str] = []
    index: dict[str, int] = {}
    remap = np.empty(len(spellings), dtype=np.int64)
    bad_codes = []
    for k, spelling in enumerate(spellings):
        name = (spelling or "").strip().upper()
        if SYMBOL_PATTERN.fullmatch(name) is None or not name.isascii():
            bad_codes.append(k)
        remap[k] = index.setdefault(name, len(names))
        if remap[k] == len(names):
            names.append(name)
    nulls = pc.is_null(encoded.indices).to_numpy(zero_copy_only=False)
    problems.add(np.flatnonzero(nulls), "symbol", "symbol is empty")
    safe = np.where(nulls, 0, np.nan_to_num(codes.astype(np.float64))).astype(np.int64)
    bad = np.flatnonzero(np.isin(safe, bad_codes) & ~nulls)
    problems.add(bad, "symbol", lambda i: f"invalid symbol {spellings[safe[i]]!r} (letters, digits and . - ^ = _, at "
                 "most 32)")  # fmt: skip
    return names, remap[safe] if len(spellings) else safe


def _dates(column: pa.ChunkedArray, problems: _Problems) -> NDArray[np.int64]:
    """Epoch days of each row (0 where the date is bad, and the row is a problem)."""
    if pa.types.is_timestamp(column.type) or pa.types.is_date(column.type):
        days = pc.cast(column, pa.date32()) if not pa.types.is_date32(column.type) else column
        as_int = days.cast(pa.int32()).to_numpy(zero_copy_only=False)
        missing = np.flatnonzero(pc.is_null(days).to_numpy(zero_copy_only=False))
        problems.add(missing, "date", "date is empty")
        return np.nan_to_num(as_int.astype(np.float64)).astype(np.int64)
    text = column.cast(pa.string()).to_numpy(zero_copy_only=False)
    out = np.zeros(len(text), dtype=np.int64)
    bad: list[int] = []
    messages: dict[int, str] = {}
    for i, value in enumerate(text.tolist()):
        try:
            out[i] = parse_date(value or "").toordinal() - ORDINAL_1970
        except ValueError as exc:
            bad.append(i)
            messages[i] = str(exc)
    problems.add(bad, "date", messages.__getitem__)
    return out


def _floats(column: pa.ChunkedArray, name: str, problems: _Problems) -> NDArray[np.float64]:
    """The column as float64. An empty cell, text that is not a plain number (``1_000``, ``abc``) and NaN are each
    their row's problem (NaN in what is returned)."""
    if pa.types.is_integer(column.type) or pa.types.is_floating(column.type):
        values = np.asarray(column.cast(pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64)
        nulls = pc.is_null(column).to_numpy(zero_copy_only=False)
        problems.add(np.flatnonzero(nulls), name, f"{name} is empty")
        problems.add(np.flatnonzero(np.isnan(values) & ~nulls), name, f"{name} must be finite, got nan")
        return values
    text = column.cast(pa.string()).to_numpy(zero_copy_only=False)
    plain = not pc.any(pc.match_substring_regex(column.cast(pa.string()), r"[_\s]|[^\x00-\x7f]|^$")).as_py()
    if plain:
        try:
            values = np.asarray(text, dtype=np.float64)  # the common case: every cell a plain number
            problems.add(np.flatnonzero(np.isnan(values)), name, f"{name} must be finite, got nan")
            return values
        except ValueError:
            pass
    out = np.full(len(text), np.nan)
    for i, value in enumerate(text.tolist()):
        raw = (value or "").strip()
        try:
            out[i] = float(raw) if raw.isascii() and "_" not in raw else np.nan
            bad = np.isnan(out[i])
        except ValueError:
            bad = True
        if bad and not raw:
            problems.add([i], name, f"{name} is empty")
        elif bad:
            finite = raw.lower() in ("nan", "+nan", "-nan")
            problems.add(
                [i], name, f"{name} must be finite, got {raw!r}" if finite else f"{name} {raw!r} is not a number"
            )
    return out


def _check_values(values: NDArray[np.float64], problems: _Problems) -> None:
    """The CSV importer's rules (shared.marketdata.csv_import), over whole columns."""
    for k, name in enumerate(VALUE_COLUMNS[:4]):
        column = values[k]
        bad = np.flatnonzero(~(np.isfinite(column) & (column > 0)) & ~np.isnan(column))  # NaN: reported already
        problems.add(bad, name, lambda i, c=column, n=name: f"{n} must be finite and > 0, got {float(c[i])!r}")
    volume = values[4]
    bad = np.flatnonzero(~np.isnan(volume) & ~(np.isfinite(volume) & (volume >= 0) & (volume == np.floor(volume))
                                                & (volume <= MAX_VOLUME)))  # fmt: skip
    problems.add(bad, "volume", lambda i: f"volume must be a whole number in [0, 2**53], got {float(volume[i])!r}")
    open_, high, low, close = values[:4]
    priced = (np.isfinite(values[:4]) & (values[:4] > 0)).all(axis=0)  # the envelope of a row whose prices are good
    top = np.maximum(np.maximum(open_, close), low)
    bottom = np.minimum(open_, close)
    problems.add(np.flatnonzero(priced & (high < top - OHLC_TOLERANCE * top)), "high",
                 lambda i: f"high {float(high[i])!r} is below max(open, close, low) = {float(top[i])!r}")  # fmt: skip
    problems.add(np.flatnonzero(priced & (low > bottom + OHLC_TOLERANCE * bottom)), "low",
                 lambda i: f"low {float(low[i])!r} is above min(open, close) = {float(bottom[i])!r}")  # fmt: skip


def _by_symbol(
    symbols: list[str],
    codes: NDArray[np.int64],
    days: NDArray[np.int64],
    values: NDArray[np.float64],
    problems: _Problems,
) -> dict[str, Columns]:
    """Each symbol's bars in date order; a repeated (symbol, date) is a problem naming the date."""
    order = np.lexsort((days, codes))
    by_code, by_day = codes[order], days[order]
    repeats = np.flatnonzero((by_code[1:] == by_code[:-1]) & (by_day[1:] == by_day[:-1])) + 1
    problems.add(order[repeats], "date", lambda i: f"duplicate bar for {symbols[codes[i]]} on {_iso(int(days[i]))}")
    return by_symbol(symbols, codes, days, values) if not repeats.size else {}


def _iso(day: int) -> str:
    return str(np.datetime64(int(day), "D"))


def _merge(parts: list[FileBars]) -> tuple[dict[str, Columns], list[RowProblem]]:
    """The files' bars as one import; a symbol in two files is a problem (which file is right?)."""
    merged: dict[str, Columns] = {}
    where: dict[str, str] = {}
    problems = []
    for part in parts:
        for symbol, columns in part.columns.items():
            if symbol in merged:
                problems.append(RowProblem(0, "symbol", f"{symbol} is also in {where[symbol]}", source=part.source,
                                           unit="file"))  # fmt: skip
                continue
            merged[symbol], where[symbol] = columns, part.source
    return merged, problems
