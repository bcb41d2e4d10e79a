"""Corporate actions: importing splits, cash dividends and delistings, and reading them for adjusted bars.

The file (``./alphaforge bars actions import FILE``) is CSV or Parquet with the columns ``symbol, date, action, value``
in any order and case (``ex_date``, ``ex-date`` or ``Ex Date`` may name the date, ``type`` or ``kind`` the action,
``ratio`` or ``amount`` the value):

* ``split``: ``value`` is new shares per old share (4 for a 4-for-1 split, 0.1 for a 1-for-10 reverse split), on
  the ex-date (the first day the price trades split);
* ``dividend``: ``value`` is the cash per share as paid (not split-adjusted), on the ex-date;
* ``delist``: no ``value``; the date is the symbol's last trading day (``symbols.delisted_on``). The symbol keeps
  its row and its bars: a universe taken as of an earlier day still holds it (shared.marketdata.listings).

As for bars (shared.marketdata.csv_import), every row is checked before anything is written (a known symbol, a
``YYYY-MM-DD`` date, a known action, a finite value > 0, no (symbol, action, date) twice), each problem naming the
file and its line (CSV, header = 1) or row (Parquet, 1-based); one bad row and nothing is imported. Actions are
upserted by (symbol, kind, date): importing the same file again changes nothing, and actions stored before that the
file lacks are kept. Adjusted prices depend on the actions, so an import that changes a symbol's actions gives every
bar series of that symbol the import's one new data version (a job reading adjusted bars sees new data, and cached
chunks of the old version are read again), under the bar imports' lock; a delisting changes no price and no version.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
from sqlalchemy import Connection, Engine, text

from shared.marketdata import listings
from shared.marketdata.adjust import Actions
from shared.marketdata.csv_import import MAX_KEPT_PROBLEMS, BarsImportError, RowProblem, parse_date, parse_symbol
from shared.marketdata.store import lock_bar_loads

SPLIT, DIVIDEND, DELIST = "split", "dividend", "delist"
KINDS: tuple[str, ...] = (SPLIT, DIVIDEND)  # what corporate_actions holds
ACTIONS: tuple[str, ...] = (*KINDS, DELIST)  # what a file may say
COLUMNS: tuple[str, ...] = ("symbol", "date", "action", "value")
_ALIASES: dict[str, str] = {
    "symbol": "symbol",
    "date": "date",
    "ex_date": "date",
    "exdate": "date",
    "action": "action",
    "type": "action",
    "kind": "action",
    "value": "value",
    "ratio": "value",
    "amount": "value",
}
_T = TypeVar("_T")


@dataclass(frozen=True)
class ActionRow:
    """One valid row: ``line`` is its CSV line or Parquet row; ``value`` is None for a delisting."""

    line: int
    symbol: str
    day: dt.date
    action: str
    value: float | None


@dataclass(frozen=True)
class ActionsFile:
    """A file's rows, each valid on its own and no (symbol, action, date) twice (symbols not yet checked as known)."""

    source: str
    unit: str  # "line" (CSV) or "row" (Parquet)
    rows: list[ActionRow]


class _Problems:
    """A file's problems: all counted, the first :data:`MAX_KEPT_PROBLEMS` kept."""

    def __init__(self, source: str, unit: str) -> None:
        self.source, self.unit = source, unit
        self.kept: list[RowProblem] = []
        self.total = 0

    def add(self, line: int, field: str | None, message: str) -> None:
        self.total += 1
        if len(self.kept) < MAX_KEPT_PROBLEMS:
            self.kept.append(RowProblem(line, field, message, source=self.source, unit=self.unit))

    def raise_if_any(self) -> None:
        if self.total:
            self.kept.sort(key=lambda p: p.line)
            raise BarsImportError(self.source, self.kept, total_problems=self.total)


def _whole(source: str, message: str) -> BarsImportError:
    return BarsImportError(source, [RowProblem(0, None, message, source=source, unit="file")])


# --------------------------------------------------------------------------------------------------
# Reading and validating a file (no database)
# --------------------------------------------------------------------------------------------------

Cells = dict[str, object]


def _layout(header: Sequence[object]) -> tuple[dict[str, int] | None, str | None]:
    """Each column's position by its canonical name, or why the header is not acceptable."""
    shown = [str(name).strip().lstrip("\ufeff").strip() for name in header]
    names = [name.lower().replace("-", "_").replace(" ", "_") for name in shown]
    found: dict[str, int] = {}
    repeated, extra = [], []
    for i, name in enumerate(names):
        canonical = _ALIASES.get(name)
        if canonical is None:
            extra.append(repr(shown[i]))
        elif canonical in found:
            repeated.append(canonical)
        else:
            found[canonical] = i
    missing = [c for c in COLUMNS if c not in found]
    parts = [f"missing column(s) {', '.join(missing)}"] if missing else []
    parts += [f"unexpected column(s) {', '.join(extra)}"] if extra else []
    parts += [f"repeated column(s) {', '.join(sorted(set(repeated)))}"] if repeated else []
    if parts:
        return None, f"columns must be {','.join(COLUMNS)} (any order and case): {'; '.join(parts)}"
    return found, None


def _csv_rows(file: Path, problems: _Problems) -> Iterator[tuple[int, Cells]]:
    """Each data row's line (physical, header = 1) and cells. Undecodable bytes become U+FFFD and fail their field."""
    with file.open(newline="", encoding="utf-8-sig", errors="replace") as stream:
        reader = csv.reader(stream, strict=True)
        try:
            header = next(reader, None)
        except csv.Error as exc:
            problems.add(1, None, f"unreadable header: {exc}")
            return
        if not header:
            problems.add(1, None, "empty first line: a header row is required")
            return
        layout, error = _layout(header)
        if layout is None:
            problems.add(1, None, str(error))
            return
        next_line = reader.line_num + 1
        while True:
            line = next_line
            try:
                fields = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:  # the csv module cannot resynchronise after a broken quote: stop here
                problems.add(line, None, f"unreadable CSV: {exc}")
                return
            next_line = reader.line_num + 1
            if not fields:
                continue
            if len(fields) != len(header):
                problems.add(line, None, f"expected {len(header)} columns, got {len(fields)}")
                continue
            yield line, {name: fields[i] for name, i in layout.items()}


def _parquet_rows(file: Path, problems: _Problems) -> Iterator[tuple[int, Cells]]:
    """Each row's number (1-based) and cells, as Python values (str, date, datetime, numbers, None)."""
    import pyarrow as pa  # only a Parquet file's import pays for pyarrow, not every reader of bars
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(file)
    except (pa.ArrowInvalid, OSError) as exc:
        raise _whole(str(file), f"unreadable file: {exc}") from None
    layout, error = _layout(table.column_names)
    if layout is None:
        raise _whole(str(file), str(error))
    columns = {name: table.column(i).to_pylist() for name, i in layout.items()}
    for k in range(table.num_rows):
        yield k + 1, {name: values[k] for name, values in columns.items()}


def _symbol(raw: object) -> str:
    if raw is None:
        raise ValueError("symbol is empty")
    if not isinstance(raw, str):
        raise ValueError(f"symbol must be text, got {raw!r}")
    return parse_symbol(raw)


def _day(raw: object) -> dt.date:
    if isinstance(raw, dt.datetime):
        return raw.date()
    if isinstance(raw, dt.date):
        return raw
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        raise ValueError("date is empty")
    if not isinstance(raw, str):
        raise ValueError(f"date {raw!r} is not YYYY-MM-DD")
    return parse_date(raw)


def _action(raw: object) -> str:
    action = raw.strip().lower() if isinstance(raw, str) else None
    if not action:
        raise ValueError(f"action is empty: use {', '.join(ACTIONS)}")
    if action not in ACTIONS:
        raise ValueError(f"unknown action {str(raw).strip()[:40]!r}: use {', '.join(ACTIONS)}")
    return action


_NEEDS_VALUE = {
    SPLIT: "a split needs its ratio, new shares per old share (4 for a 4-for-1 split, 0.1 for 1-for-10)",
    DIVIDEND: "a dividend needs its cash amount per share",
}


def _value(raw: object, action: str | None) -> float | None:
    """A finite float > 0 (a delisting: empty), with a message naming what the action's value means."""
    text_value = raw.strip() if isinstance(raw, str) else raw
    if text_value is None or text_value == "":
        if action in _NEEDS_VALUE:
            raise ValueError(f"value is empty: {_NEEDS_VALUE[action]}")
        return None
    if action == DELIST:
        raise ValueError(f"a delisting takes no value (the date is the last trading day), got {text_value!r}")
    if isinstance(text_value, bool) or not isinstance(text_value, (str, int, float)):
        raise ValueError(f"value {text_value!r} is not a number")
    if isinstance(text_value, str):
        if not text_value.isascii() or "_" in text_value:
            raise ValueError(f"value {text_value!r} is not a number")
        try:
            value = float(text_value)
        except ValueError:
            hint = f": {_NEEDS_VALUE[SPLIT]}" if action == SPLIT else ""
            raise ValueError(f"value {text_value!r} is not a number{hint}") from None
    else:
        value = float(text_value)
    if not math.isfinite(value):
        raise ValueError(f"value must be finite, got {text_value!r}")
    if value <= 0:
        raise ValueError(f"value must be > 0, got {text_value!r}")
    return value


def _parse(line: int, cells: Cells, problems: _Problems) -> ActionRow | None:
    """One row, or None with each bad field a problem."""
    symbol = _field(_symbol, cells["symbol"], line, "symbol", problems)
    day = _field(_day, cells["date"], line, "date", problems)
    action = _field(_action, cells["action"], line, "action", problems)
    try:
        value = _value(cells["value"], action)
    except ValueError as exc:
        problems.add(line, "value", str(exc))
        return None
    if symbol is None or day is None or action is None:
        return None
    return ActionRow(line, symbol, day, action, value)


def _field(parse: Callable[[object], _T], raw: object, line: int, name: str, problems: _Problems) -> _T | None:
    try:
        return parse(raw)
    except ValueError as exc:
        problems.add(line, name, str(exc))
        return None


def read_actions_file(file: Path) -> ActionsFile:
    """A file's actions, every row validated; raises :class:`BarsImportError` naming each bad row (the file and its
    line or row). Whether the symbols are known is checked by the import, in its transaction."""
    source = str(file)
    suffix = file.suffix.lower()
    if suffix not in (".csv", ".parquet"):
        raise _whole(source, "not a .csv or .parquet file")
    problems = _Problems(source, "line" if suffix == ".csv" else "row")
    cells = _csv_rows(file, problems) if suffix == ".csv" else _parquet_rows(file, problems)
    rows: list[ActionRow] = []
    first: dict[tuple[str, str, dt.date], int] = {}
    delisted: dict[str, ActionRow] = {}
    for line, row_cells in cells:
        row = _parse(line, row_cells, problems)
        if row is None:
            continue
        key = (row.symbol, row.action, row.day)
        if key in first:
            problems.add(line, "date", f"duplicate {row.action} for {row.symbol} on {row.day} (first on "
                         f"{problems.unit} {first[key]})")  # fmt: skip
            continue
        first[key] = line
        if row.action == DELIST and row.symbol in delisted:
            earlier = delisted[row.symbol]
            problems.add(line, "date", f"a second delisting date for {row.symbol} (first on {problems.unit} "
                         f"{earlier.line}: {earlier.day})")  # fmt: skip
            continue
        if row.action == DELIST:
            delisted[row.symbol] = row
        rows.append(row)
    problems.raise_if_any()
    return ActionsFile(source, problems.unit, rows)


# --------------------------------------------------------------------------------------------------
# Storing
# --------------------------------------------------------------------------------------------------

_KNOWN = "SELECT symbol, delisted_on FROM symbols WHERE symbol = ANY(CAST(:symbols AS varchar[]))"

_STORED = """
SELECT symbol, kind, ex_date, value FROM corporate_actions WHERE symbol = ANY(CAST(:symbols AS varchar[]))
"""

_UPSERT = """
INSERT INTO corporate_actions (symbol, kind, ex_date, value)
SELECT * FROM unnest(CAST(:symbols AS varchar[]), CAST(:kinds AS varchar[]), CAST(:days AS date[]),
                     CAST(:values AS float8[]))
ON CONFLICT (symbol, kind, ex_date) DO UPDATE SET value = EXCLUDED.value
"""

_DELIST = """
UPDATE symbols s SET delisted_on = d.day
FROM unnest(CAST(:symbols AS varchar[]), CAST(:days AS date[])) AS d(symbol, day)
WHERE s.symbol = d.symbol
"""

_BUMP = """
UPDATE bar_series SET data_version = :version, updated_at = now() WHERE symbol = ANY(CAST(:symbols AS varchar[]))
RETURNING symbol
"""


@dataclass(frozen=True)
class ActionCounts:
    """What :func:`store_actions` did: how many of the file's rows were new, changed a stored value (or a delisting
    date), or matched what was stored; with ``replace``, how many stored actions (and delistings) of its symbols the
    file lacked and were deleted; the symbols whose bar series took the import's data version, and that version
    (None if no bars changed meaning)."""

    inserted: int
    updated: int
    unchanged: int
    deleted: int
    versioned_symbols: int
    version: int | None


@dataclass(frozen=True)
class ActionsImportReport(ActionCounts):
    """What an import did: its file, rows and symbols, its :class:`ActionCounts`, and how long it took."""

    source_name: str
    rows: int
    symbols: int
    seconds: float


_DELETE = """
DELETE FROM corporate_actions c
USING unnest(CAST(:symbols AS varchar[]), CAST(:kinds AS varchar[]), CAST(:days AS date[])) AS d(symbol, kind, day)
WHERE c.symbol = d.symbol AND c.kind = d.kind AND c.ex_date = d.day
"""

_UNDELIST = "UPDATE symbols SET delisted_on = NULL WHERE symbol = ANY(CAST(:symbols AS varchar[]))"


def store_actions(conn: Connection, parsed: ActionsFile, *, replace: bool = False) -> ActionCounts:
    """In ``conn``'s transaction: take the bar-load lock, check every symbol is known (and a delisting not before the
    symbol's first trading date), upsert the actions and delistings that differ from what is stored (with
    ``replace``, the file is its symbols' whole history: their stored actions and delisting it lacks are deleted; a
    vendor's correction of a date), and give every bar series of a symbol whose actions changed one new data version.
    Raises :class:`BarsImportError` (the caller's transaction must then roll back; nothing has been written)."""
    lock_bar_loads(conn)
    symbols = sorted({row.symbol for row in parsed.rows})
    delisted_on = {symbol: day for symbol, day in conn.execute(text(_KNOWN), {"symbols": symbols})}
    ranges = listings.listings(conn, [row.symbol for row in parsed.rows if row.action == DELIST])
    problems = _Problems(parsed.source, parsed.unit)
    for row in parsed.rows:
        if row.symbol not in delisted_on:
            problems.add(row.line, "symbol", f"unknown symbol {row.symbol} (import its bars first)")
        elif row.action == DELIST and (first := ranges[row.symbol].listed_on) is not None and row.day < first:
            problems.add(row.line, "date", f"{row.symbol} is delisted on {row.day}, before its first trading date "
                         f"{first}")  # fmt: skip
    problems.raise_if_any()

    stored = {(s, k, d): v for s, k, d, v in conn.execute(text(_STORED), {"symbols": symbols})}
    writes: list[ActionRow] = []
    delists: list[ActionRow] = []
    inserted = updated = 0
    for row in parsed.rows:
        before = delisted_on[row.symbol] if row.action == DELIST else stored.get((row.symbol, row.action, row.day))
        now = row.day if row.action == DELIST else row.value
        if before == now:
            continue
        inserted += before is None
        updated += before is not None
        (delists if row.action == DELIST else writes).append(row)
    if writes:
        conn.execute(text(_UPSERT), {"symbols": [r.symbol for r in writes], "kinds": [r.action for r in writes],
                                     "days": [r.day for r in writes], "values": [r.value for r in writes]})  # fmt: skip
    if delists:
        conn.execute(text(_DELIST), {"symbols": [r.symbol for r in delists], "days": [r.day for r in delists]})
    changed = {r.symbol for r in writes}
    deleted = 0
    if replace:
        given = {(r.symbol, r.action, r.day) for r in parsed.rows}
        gone = [key for key in stored if key not in given]
        if gone:
            conn.execute(text(_DELETE), {"symbols": [s for s, _, _ in gone], "kinds": [k for _, k, _ in gone],
                                         "days": [d for _, _, d in gone]})  # fmt: skip
        delisting = {r.symbol for r in parsed.rows if r.action == DELIST}
        undelist = sorted(s for s in symbols if delisted_on[s] is not None and s not in delisting)
        if undelist:
            conn.execute(text(_UNDELIST), {"symbols": undelist})
        changed |= {s for s, _, _ in gone}
        deleted = len(gone) + len(undelist)
    version, versioned = _bump_versions(conn, sorted(changed))
    return ActionCounts(inserted, updated, len(parsed.rows) - inserted - updated, deleted, versioned, version)


def _bump_versions(conn: Connection, symbols: list[str]) -> tuple[int | None, int]:
    """One new data version on every bar series of ``symbols`` (if they have any): the version and the symbols."""
    if not symbols:
        return None, 0
    has_series = conn.scalar(
        text("SELECT EXISTS (SELECT 1 FROM bar_series WHERE symbol = ANY(CAST(:symbols AS varchar[])))"),
        {"symbols": symbols},
    )
    if not has_series:
        return None, 0
    version = int(conn.execute(text("SELECT nextval('bar_data_version')")).scalar_one())
    bumped = set(conn.scalars(text(_BUMP), {"version": version, "symbols": symbols}))
    return version, len(bumped)


def import_actions(engine: Engine, file: Path, *, replace: bool = False) -> ActionsImportReport:
    """Validate ``file``, then store it in one transaction: all of it, or nothing (:class:`BarsImportError`).
    ``replace``: as for :func:`store_actions`."""
    started = time.perf_counter()
    parsed = read_actions_file(file)
    with engine.begin() as conn:
        counts = store_actions(conn, parsed, replace=replace)
    return ActionsImportReport(
        **dataclasses.asdict(counts),
        source_name=parsed.source,
        rows=len(parsed.rows),
        symbols=len({row.symbol for row in parsed.rows}),
        seconds=time.perf_counter() - started,
    )


# --------------------------------------------------------------------------------------------------
# Reading, for the bar read path
# --------------------------------------------------------------------------------------------------

_READ = """
SELECT symbol, kind, ex_date - DATE '1970-01-01', value FROM corporate_actions
WHERE symbol = ANY(CAST(:symbols AS varchar[])) ORDER BY symbol, kind, ex_date
"""


def read_actions(conn: Connection, symbols: Sequence[str]) -> dict[str, Actions]:
    """The splits and dividends of each of ``symbols`` (one query), each kind sorted by day (epoch days of the
    ex-date); a symbol without any has ``Actions.empty()``."""
    found: dict[str, dict[str, tuple[list[int], list[float]]]] = {}
    if symbols:
        for symbol, kind, day, value in conn.execute(text(_READ), {"symbols": list(dict.fromkeys(symbols))}):
            days, values = found.setdefault(symbol, {}).setdefault(kind, ([], []))
            days.append(day)
            values.append(value)
    out: dict[str, Actions] = {}
    for symbol in symbols:
        kinds = found.get(symbol)
        if kinds is None:
            out[symbol] = Actions.empty()
            continue
        split_days, split_ratios = kinds.get(SPLIT, ([], []))
        dividend_days, dividend_amounts = kinds.get(DIVIDEND, ([], []))
        out[symbol] = Actions(
            np.asarray(split_days, dtype=np.int64),
            np.asarray(split_ratios, dtype=np.float64),
            np.asarray(dividend_days, dtype=np.int64),
            np.asarray(dividend_amounts, dtype=np.float64),
        )
    return out
