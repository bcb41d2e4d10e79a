"""Importing bars from Parquet files and from folders of per-symbol files, validated as whole columns.

What it takes:

* a Parquet file with the CSV importer's columns (``symbol, date, open, high, low, close, volume``); without a
  ``symbol`` column it is one symbol's file, named ``SYMBOL.parquet``;
* intraday bars: the same with a ``timestamp`` (or ``datetime``) column in place of ``date``: ISO 8601 text or a
  Parquet timestamp, with a UTC offset, or without one in the zone ``tz`` names (``--tz``); the timeframe is
  ``--timeframe``, or the most common spacing of a file's bars when that is a stored timeframe's length;
* a folder of per-symbol files, ``SYMBOL.csv`` or ``SYMBOL.parquet``, in the layout common downloaders write
  (``Date,Open,High,Low,Close,Adj Close,Volume``, any column case; ``Adj Close`` is not imported: adjustments are
  computed from corporate actions, not taken from a vendor's column).

Every value is checked in numpy over whole columns with the CSV importer's rules (prices finite and > 0, a whole
volume in [0, 2**53], high and low enclosing the body, one bar per symbol and date or timestamp, intraday bars at
least a timeframe apart); a file's problems name the file and its row (Parquet, 1-based) or line (CSV, header = 1).
Nothing is loaded unless every file is good; then
everything goes into the store in one transaction (``store.import_columns``): idempotent, all or nothing.
"""

from __future__ import annotations

import csv
import datetime as dt
import sys
import time
import zoneinfo
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
from tqdm import tqdm

from shared.marketdata import store
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
from shared.marketdata.series import (
    DEFAULT_TIMEFRAME,
    SECONDS_PER_DAY,
    SYMBOL_PATTERN,
    TIMEFRAME_SECONDS,
    Columns,
    by_symbol,
)

VALUE_COLUMNS = ("open", "high", "low", "close", "volume")
IGNORED_COLUMNS = ("adj close", "adj_close", "adjclose")
MAX_VOLUME = 2**53
SUFFIXES = (".csv", ".parquet")
TIME_COLUMNS = ("timestamp", "datetime")  # an intraday file's time column (any case); a daily file's is ``date``
_TIMEFRAME_OF_SECONDS = {seconds: name for name, seconds in TIMEFRAME_SECONDS.items()}


@dataclass(frozen=True)
class FileBars:
    """One file's valid bars, per symbol, their timeframe, and how many rows it had."""

    source: str
    rows: int
    columns: dict[str, Columns]
    timeframe: str = DEFAULT_TIMEFRAME


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


def import_path(
    engine: Engine,
    path: Path,
    *,
    timeframe: str | None = None,
    tz: str | None = None,
    exchange_tz: str | None = None,
    progress: bool | None = None,
) -> ImportReport:
    """Validate every file of ``path`` (a CSV or Parquet file, or a folder of per-symbol files) and load them in one
    transaction. Raises :class:`BarsImportError` naming every bad row of every file (nothing loaded). A daily CSV
    file with a ``symbol`` column goes to the CSV importer (shared.marketdata.csv_import).

    The files are read one at a time and each is written as soon as it is found good (``store.BarLoad``: one
    transaction, one data version): memory holds one file's bars, not the import's. After a bad file the rest are
    still validated, so that every problem is named, and the transaction is rolled back.

    ``timeframe``: the bars' timeframe (default: daily for a ``date`` column, inferred for a ``timestamp`` one);
    ``tz``: the time zone of timestamps written without a UTC offset (default: ``exchange_tz``); ``exchange_tz``:
    the symbols' exchange time zone, set with their bars (sessions, local dates and resampling follow it);
    ``progress``: progress bars on standard error (default: when it is a terminal)."""
    tz = tz or exchange_tz
    header = _csv_header(path) if path.is_file() and path.suffix.lower() == ".csv" else set()
    if "symbol" in header and "date" in header and timeframe in (None, DEFAULT_TIMEFRAME):
        return import_csv_file(engine, path, exchange_tz=exchange_tz)  # its own format, checked line by line
    started = time.perf_counter()
    files = per_symbol_files(path) if path.is_dir() else [path]
    problems: list[RowProblem] = []
    total = rows = symbols = 0
    where: dict[str, str] = {}  # each symbol's file: a symbol in two files is a problem (which one is right?)
    first: FileBars | None = None  # the first good file: its timeframe is the import's
    show = sys.stderr.isatty() if progress is None else progress
    with engine.begin() as conn, tqdm(files, desc="importing", unit="file", disable=not show or len(files) < 2,
                                         file=sys.stderr) as bar:  # fmt: skip
        load: store.BarLoad | None = None
        for file in bar:
            try:
                part = read_file(file, timeframe=timeframe, tz=tz)
            except BarsImportError as exc:
                problems.extend(exc.problems)
                total += exc.total_problems
                continue
            first = first or part
            found = _conflicts(part, first, where)
            problems.extend(found)
            total += len(found)
            rows += part.rows
            symbols += len(part.columns)
            if not total and part.columns:
                load = load or store.BarLoad(conn, part.timeframe, exchange_tz=exchange_tz)
                bars = sum(len(c) for c in part.columns.values())
                with tqdm(total=bars, desc="writing", unit="bar", unit_scale=True, leave=False,
                          disable=not show or len(files) > 1, file=sys.stderr) as written:  # fmt: skip
                    load.add(part.columns, on_written=written.update)
        if total:
            problems.sort(key=lambda p: (p.source or "", p.line))
            raise BarsImportError(str(path), problems[:MAX_KEPT_PROBLEMS], total_problems=total)  # rolls back
        counts = load.counts if load else None
    return ImportReport(
        source_name=str(path),
        rows=rows,
        symbols=symbols,
        inserted=counts.inserted if counts else 0,
        updated=counts.updated if counts else 0,
        seconds=time.perf_counter() - started,
    )


def _conflicts(part: FileBars, first: FileBars, where: dict[str, str]) -> list[RowProblem]:
    """A file's problems with the files before it: another timeframe than the first file's, or a symbol another
    file holds (``where`` learns the file's symbols)."""
    found = []
    if part.timeframe != first.timeframe:
        found.append(RowProblem(0, None, f"holds {part.timeframe} bars, and {first.source} {first.timeframe} ones: "
                                "one import holds one timeframe (give --timeframe, or import them apart)",
                                source=part.source, unit="file"))  # fmt: skip
    for symbol in part.columns:
        if symbol in where:
            found.append(RowProblem(0, "symbol", f"{symbol} is also in {where[symbol]}", source=part.source,
                                    unit="file"))  # fmt: skip
        else:
            where[symbol] = part.source
    return found


def _csv_header(file: Path) -> set[str]:
    with file.open(newline="", encoding="utf-8-sig", errors="replace") as stream:
        return {name.strip().lower() for name in next(csv.reader(stream), [])}


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


def read_file(file: Path, *, timeframe: str | None = None, tz: str | None = None) -> FileBars:
    """One file's bars, validated. A file without a ``symbol`` column holds one symbol's bars: its name's stem.
    ``timeframe`` and ``tz`` as for :func:`import_path`."""
    source = str(file)
    is_csv = file.suffix.lower() == ".csv"
    problems = _Problems(source, "line" if is_csv else "row", 2 if is_csv else 1)
    try:
        table = _read_table(file, is_csv)
    except (pa.ArrowInvalid, OSError) as exc:
        raise _whole(file, f"unreadable file: {exc}") from None
    names = {name.strip().lstrip("\ufeff").strip().lower(): name for name in table.column_names}
    symbol = None if "symbol" in names else _symbol_of(file)  # a file without a symbol column is SYMBOL.ext
    clock = next((c for c in ("date", *TIME_COLUMNS) if c in names), "date")
    wanted = [clock, *VALUE_COLUMNS] + ([] if symbol is not None else ["symbol"])
    missing = [c for c in wanted if c not in names]
    extra = [n for n in names if n not in wanted and n not in IGNORED_COLUMNS]
    if missing or extra:
        parts = ([f"missing column(s) {', '.join(missing)}"] if missing else []) + (
            [f"unexpected column(s) {', '.join(repr(e) for e in extra)}"] if extra else []
        )
        raise _whole(file, f"columns must be {','.join(wanted)} (any order and case): {'; '.join(parts)}")
    if clock == "date" and timeframe not in (None, DEFAULT_TIMEFRAME):
        raise _whole(file, f"a date column holds daily bars, not {timeframe} ones: intraday bars need a timestamp "
                     "column")  # fmt: skip
    n = table.num_rows
    if symbol is not None and SYMBOL_PATTERN.fullmatch(symbol) is None:
        raise _whole(file, f"file name {file.name!r} is not a symbol (letters, digits and . - ^ = _, at most 32)")
    if symbol is not None:
        symbols, codes = [symbol], np.zeros(n, dtype=np.int64)
    else:
        symbols, codes = _symbols(table[names["symbol"]], problems)
    if clock == "date":
        ts = _dates(table[names["date"]], problems) * SECONDS_PER_DAY
    else:
        ts = _timestamps(table[names[clock]], clock, tz, problems, file)
    values = np.stack([_floats(table[names[c]], c, problems) for c in VALUE_COLUMNS]) if n else np.empty((5, 0))
    _check_values(values, problems)
    problems.raise_if_any()
    found = DEFAULT_TIMEFRAME if clock == "date" else timeframe or _infer_timeframe(codes, ts)
    if found is None:
        raise _whole(file, "cannot tell the bars' timeframe from their timestamps (their most common spacing is not "
                     f"one of {', '.join(TIMEFRAME_SECONDS)}): give --timeframe")  # fmt: skip
    if clock != "date" and found == DEFAULT_TIMEFRAME:
        problems.add(np.flatnonzero(ts % SECONDS_PER_DAY), clock, "a daily bar's timestamp must be a date (00:00 UTC)")
    problems.raise_if_any()
    columns = _by_symbol(symbols, codes, ts, values, problems, found, clock)
    problems.raise_if_any()
    return FileBars(source, n, columns, found)


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
    ts: NDArray[np.int64],
    values: NDArray[np.float64],
    problems: _Problems,
    timeframe: str,
    clock: str,
) -> dict[str, Columns]:
    """Each symbol's bars in time order; a repeated (symbol, ts) is a problem naming it, and so is an intraday bar
    less than a timeframe after the one before it (the file is not at that timeframe)."""
    order = np.lexsort((ts, codes))
    by_code, by_ts = codes[order], ts[order]
    same = by_code[1:] == by_code[:-1]
    gaps = by_ts[1:] - by_ts[:-1]
    repeats = np.flatnonzero(same & (gaps == 0)) + 1
    problems.add(order[repeats], clock, lambda i: f"duplicate bar for {symbols[codes[i]]} on {_iso(int(ts[i]))}")
    step = TIMEFRAME_SECONDS[timeframe]
    if step < SECONDS_PER_DAY:
        close = np.flatnonzero(same & (gaps > 0) & (gaps < step)) + 1
        problems.add(order[close], clock, lambda i: f"{symbols[codes[i]]} at {_iso(int(ts[i]))} is less than a "
                     f"{timeframe} bar after the bar before it")  # fmt: skip
    return by_symbol(symbols, codes, ts, values) if not problems.total else {}


def _infer_timeframe(codes: NDArray[np.int64], ts: NDArray[np.int64]) -> str | None:
    """The intraday timeframe whose length is the most common spacing of consecutive bars of a symbol."""
    order = np.lexsort((ts, codes))
    gaps = np.diff(ts[order])[(np.diff(codes[order]) == 0)]
    gaps = gaps[gaps > 0]
    if not gaps.size:
        return None
    spacings, counts = np.unique(gaps, return_counts=True)
    found = _TIMEFRAME_OF_SECONDS.get(int(spacings[np.argmax(counts)]))
    return found if found != DEFAULT_TIMEFRAME else None


def _timestamps(
    column: pa.ChunkedArray, clock: str, tz: str | None, problems: _Problems, file: Path
) -> NDArray[np.int64]:
    """Epoch seconds (UTC) of each row: vectorised when the whole column parses one way, else row by row, each bad
    row a problem. A timestamp without an offset is wall-clock time in ``tz`` (a whole-file problem without it)."""
    micros: pa.ChunkedArray | None = None
    if pa.types.is_timestamp(column.type) or pa.types.is_date(column.type):
        aware = pa.types.is_timestamp(column.type) and column.type.tz is not None
        micros = column.cast(pa.timestamp("us", tz="UTC") if aware else pa.timestamp("us"))
        if not aware:
            micros = _assume(micros, tz, file)
    else:
        text = pc.utf8_trim_whitespace(column.cast(pa.string()))
        try:
            micros = text.cast(pa.timestamp("us", tz="UTC"))
        except pa.ArrowInvalid:
            try:
                micros = _assume(text.cast(pa.timestamp("us")), tz, file)
            except pa.ArrowInvalid:
                micros = None
        if micros is None:
            return _timestamps_by_row(text.to_pylist(), clock, tz, problems, file)
    raw = micros.cast(pa.int64()).to_numpy(zero_copy_only=False)
    missing = pc.is_null(micros).to_numpy(zero_copy_only=False)
    problems.add(np.flatnonzero(missing), clock, f"{clock} is empty")
    values = np.nan_to_num(raw.astype(np.float64)).astype(np.int64) if missing.any() else raw.astype(np.int64)
    problems.add(np.flatnonzero(values % 1_000_000), clock, "bars start on a whole second")
    return values // 1_000_000


def _assume(naive: pa.ChunkedArray, tz: str | None, file: Path) -> pa.ChunkedArray:
    """Naive timestamps as instants in ``tz`` (raises ArrowInvalid on a time the zone skips or repeats)."""
    if tz is None:
        raise _whole(file, "timestamps without a UTC offset need --tz, the time zone they are in (e.g. "
                     "America/New_York)")  # fmt: skip
    return pc.assume_timezone(naive, timezone=tz, ambiguous="raise", nonexistent="raise")


def _timestamps_by_row(
    text: list[str | None], clock: str, tz: str | None, problems: _Problems, file: Path
) -> NDArray[np.int64]:
    zone = zoneinfo.ZoneInfo(tz) if tz else None
    out = np.zeros(len(text), dtype=np.int64)
    for i, raw in enumerate(text):
        message = None
        try:
            stamp = dt.datetime.fromisoformat(raw or "")
        except ValueError:
            message = f"{clock} {raw!r} is not an ISO 8601 timestamp" if raw else f"{clock} is empty"
        else:
            if stamp.tzinfo is None:
                if zone is None:
                    raise _whole(file, "timestamps without a UTC offset need --tz, the time zone they are in (e.g. "
                                 "America/New_York)")  # fmt: skip
                first, second = stamp.replace(tzinfo=zone), stamp.replace(tzinfo=zone, fold=1)
                if first.utcoffset() != second.utcoffset():
                    message = f"{raw} is {'skipped' if _skipped(first) else 'repeated'} by {tz}'s clock change"
                stamp = first
            if stamp.microsecond:
                message = "bars start on a whole second"
            out[i] = int(stamp.timestamp())
        if message:
            problems.add([i], clock, message)
    return out


def _skipped(local: dt.datetime) -> bool:
    """Whether a wall-clock time does not exist in its zone (it comes back changed from a round trip via UTC)."""
    return local.astimezone(dt.UTC).astimezone(local.tzinfo).replace(tzinfo=None) != local.replace(tzinfo=None)


def _iso(ts: int) -> str:
    return str(np.datetime64(int(ts) // SECONDS_PER_DAY, "D")) if ts % SECONDS_PER_DAY == 0 else f"{_utc(ts)}Z"


def _utc(ts: int) -> str:
    return str(np.datetime64(int(ts), "s"))
