"""The bar store in PostgreSQL: series of column chunks, written by imports and read by every job.

Tables (migration 0016): ``bar_series`` has one row per (symbol, timeframe), with its ``data_version``, bar count
and first/last ``ts``; ``bar_chunks`` holds its bars, one row per chunk (``series.chunk_start``), as one bytea of
contiguous columns (``series.pack``). An import rewrites only the chunks it changes and gives every series it
changed one new ``data_version`` (the import's number, from the ``bar_data_version`` sequence), in one transaction.

A read is chunk metadata with the versions in one statement, then the bytes of the chunks this process does not
hold (one bytea per chunk, no per-bar parsing; :data:`FETCH_BATCH` chunks a statement). The versions the bytes come
with are compared with the metadata's; an import that committed in between makes the read start again, so what is
returned is one committed state of every series.

A worker process fetches chunk bytes with binary COPY (raw bytes; a SELECT sends bytea hex-encoded, twice the size,
and decoding it is most of a cold read), through ``shared.infra.db.copy_out``, which keeps the COPY bounded under
the process's wait callback; other processes (the API's) SELECT (:func:`configure`).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
from psycopg2.extensions import connection as PgConnection
from psycopg2.extensions import cursor as PgCursor
from sqlalchemy import Connection, Engine, text

from shared.infra import db
from shared.marketdata import listings, pgcopy
from shared.marketdata.series import BYTES_PER_BAR, Columns, concat, merge, pack, split_chunks, unpack

READ_ATTEMPTS = 5
FETCH_BATCH = 250  # chunks a statement fetches: 30 MB of decade chunks of daily bars


class ConcurrentImport(RuntimeError):
    """Imports kept committing during a read (every attempt saw a new version between metadata and bytes)."""


@dataclass(frozen=True)
class Series:
    """One series as read: its data version and its bars (read-only arrays, shared with the process's cache)."""

    version: int
    columns: Columns


# --------------------------------------------------------------------------------------------------
# The process's chunk cache
# --------------------------------------------------------------------------------------------------

ChunkKey = tuple[str, str, int, int]  # symbol, timeframe, chunk's first day (epoch days), data version


class ChunkCache:
    """Decoded chunks, least recently used first out, bounded in bytes. A chunk of a newer version of a series
    evicts that series' older chunks (an import invalidates what it changed). Thread-safe (the API's threads)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._chunks: OrderedDict[ChunkKey, Columns] = OrderedDict()
        self._versions: dict[tuple[str, str], int] = {}
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._chunks)

    def get(self, key: ChunkKey) -> Columns | None:
        with self._lock:
            found = self._chunks.get(key)
            if found is None:
                self.misses += 1
                return None
            self._chunks.move_to_end(key)
            self.hits += 1
            return found

    def put(self, key: ChunkKey, columns: Columns) -> None:
        size = len(columns) * BYTES_PER_BAR
        if size > self.max_bytes:
            return
        symbol, timeframe, _, version = key
        with self._lock:
            known = self._versions.get((symbol, timeframe))
            if known is not None and known > version:
                return  # an older version than one already seen: it is on its way out
            if known is not None and known < version:
                for stale in [k for k in self._chunks if k[:2] == (symbol, timeframe)]:
                    self._bytes -= len(self._chunks.pop(stale)) * BYTES_PER_BAR
            self._versions[(symbol, timeframe)] = version
            if key in self._chunks:
                return
            self._chunks[key] = columns
            self._bytes += size
            while self._bytes > self.max_bytes:
                (old_symbol, old_tf, _, _), evicted = self._chunks.popitem(last=False)
                self._bytes -= len(evicted) * BYTES_PER_BAR
                if not any(k[:2] == (old_symbol, old_tf) for k in self._chunks):
                    self._versions.pop((old_symbol, old_tf), None)

    def clear(self) -> None:
        with self._lock:
            self._chunks.clear()
            self._versions.clear()
            self._bytes = 0


_cache = ChunkCache(256 * 1024 * 1024)
_copy = False  # fetch chunk bytes with binary COPY (worker processes: see shared.infra.db.copy_out)


def process_cache() -> ChunkCache:
    return _cache


def configure(cache_mb: int, *, copy: bool = False) -> ChunkCache:
    """This process's cache, bounded at ``cache_mb`` (``ALPHAFORGE_BAR_CACHE_MB``; 0: no cache), and whether its
    reads fetch by binary COPY."""
    global _cache, _copy
    if _cache.max_bytes != cache_mb * 1024 * 1024:
        _cache = ChunkCache(cache_mb * 1024 * 1024)
    _copy = copy
    return _cache


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------

_META_SQL = """
SELECT h.symbol, h.data_version, c.chunk_start - DATE '1970-01-01', c.bars
FROM bar_series h JOIN bar_chunks c ON c.symbol = h.symbol AND c.timeframe = h.timeframe
WHERE h.timeframe = %(tf)s AND h.symbol = ANY(%(symbols)s::varchar[])
  AND (%(start)s::bigint IS NULL OR c.last_ts >= %(start)s::bigint)
  AND (%(end)s::bigint IS NULL OR c.first_ts <= %(end)s::bigint)
ORDER BY h.symbol, c.chunk_start
"""

_DATA_SQL = """
SELECT c.symbol, h.data_version, c.chunk_start - DATE '1970-01-01', c.bars, c.data
FROM unnest(%(symbols)s::varchar[], %(days)s::int[]) AS k(symbol, day)
JOIN bar_chunks c ON c.symbol = k.symbol AND c.timeframe = %(tf)s AND c.chunk_start = DATE '1970-01-01' + k.day
JOIN bar_series h ON h.symbol = c.symbol AND h.timeframe = c.timeframe
"""


def _cursor(conn: Connection) -> PgCursor:
    """A psycopg2 cursor in ``conn``'s transaction: bytea comes back as memoryviews that numpy reads in place."""
    return cast(PgConnection, conn.connection.driver_connection).cursor()


def read_series(
    conn: Connection,
    symbols: Sequence[str],
    timeframe: str,
    start_ts: int | None = None,
    end_ts: int | None = None,
    *,
    cache: ChunkCache | None = None,
) -> dict[str, Series]:
    """The bars of ``symbols`` at ``timeframe`` with ``start_ts <= ts <= end_ts``, each with the data version it
    is. Symbols without bars in the range are absent. ``cache`` defaults to this process's."""
    cache = _cache if cache is None else cache
    params: dict[str, Any] = {"tf": timeframe, "symbols": list(symbols), "start": start_ts, "end": end_ts}
    with _cursor(conn) as cursor:
        for _ in range(READ_ATTEMPTS):
            cursor.execute(_META_SQL, params)
            meta: list[tuple[str, int, int, int]] = cursor.fetchall()
            found: dict[ChunkKey, Columns] = {}
            wanted: list[tuple[str, int]] = []
            for symbol, version, day, _ in meta:
                key = (symbol, timeframe, day, version)
                hit = cache.get(key)
                if hit is None:
                    wanted.append((symbol, day))
                else:
                    found[key] = hit
            if wanted and not _fetch(cursor, timeframe, wanted, meta, found, cache):
                continue  # an import committed between the metadata and the bytes: read again
            return _assemble(meta, found, timeframe, start_ts, end_ts)
    raise ConcurrentImport(f"bars of {len(symbols)} symbol(s) changed under {READ_ATTEMPTS} reads in a row")


def _fetch(
    cursor: PgCursor,
    timeframe: str,
    wanted: list[tuple[str, int]],
    meta: list[tuple[str, int, int, int]],
    found: dict[ChunkKey, Columns],
    cache: ChunkCache,
) -> bool:
    """Fetch the ``wanted`` chunks into ``found`` (and the cache), :data:`FETCH_BATCH` a statement (what one statement
    holds in memory at once beside the decoded arrays); False if one is not at the version ``meta`` saw."""
    versions = {symbol: version for symbol, version, _, _ in meta}
    for lo in range(0, len(wanted), FETCH_BATCH):
        batch = wanted[lo : lo + FETCH_BATCH]
        params = {"tf": timeframe, "symbols": [s for s, _ in batch], "days": [d for _, d in batch]}
        if _copy:
            query = cursor.mogrify(_DATA_SQL, params).decode()
            buffer = db.copy_out(cursor, f"COPY ({query}) TO STDOUT WITH (FORMAT binary)")
            rows = pgcopy.decode(buffer.getbuffer(), "tqiib")
        else:
            cursor.execute(_DATA_SQL, params)
            rows = cursor.fetchall()
        if len(rows) != len(batch):
            return False
        for symbol, version, day, bars, data in rows:
            if versions.get(symbol) != version:
                return False
            key = (symbol, timeframe, day, version)
            columns = unpack(data, bars)
            found[key] = columns
            cache.put(key, columns)
    return True


def _assemble(
    meta: list[tuple[str, int, int, int]],
    found: Mapping[ChunkKey, Columns],
    timeframe: str,
    start_ts: int | None,
    end_ts: int | None,
) -> dict[str, Series]:
    parts: dict[str, list[Columns]] = {}
    versions: dict[str, int] = {}
    for symbol, version, day, _ in meta:
        parts.setdefault(symbol, []).append(found[(symbol, timeframe, day, version)])
        versions[symbol] = version
    out: dict[str, Series] = {}
    for symbol, chunks in parts.items():
        columns = concat(chunks).between(start_ts, end_ts)
        if len(columns):
            out[symbol] = Series(versions[symbol], columns)
    return out


def versions(conn: Connection, symbols: Sequence[str], timeframe: str) -> dict[str, int]:
    """The current data version of each of ``symbols`` that has bars at ``timeframe``."""
    with _cursor(conn) as cursor:
        cursor.execute(
            "SELECT symbol, data_version FROM bar_series WHERE timeframe = %s AND symbol = ANY(%s::varchar[])",
            (timeframe, list(symbols)),
        )
        return dict(cursor.fetchall())


_SIZES_SQL = """
SELECT symbol, sum(bars)::int FROM bar_chunks
WHERE timeframe = %(tf)s AND symbol = ANY(%(symbols)s::varchar[])
  AND (%(start)s::bigint IS NULL OR last_ts >= %(start)s::bigint)
  AND (%(end)s::bigint IS NULL OR first_ts <= %(end)s::bigint)
GROUP BY symbol
"""


def sizes(
    conn: Connection, symbols: Sequence[str], timeframe: str, start_ts: int | None = None, end_ts: int | None = None
) -> dict[str, int]:
    """How many bars each of ``symbols`` has at ``timeframe`` in the chunks that meet [start_ts, end_ts] (an upper
    bound of the bars in the range, from chunk metadata: no bytes read)."""
    with _cursor(conn) as cursor:
        cursor.execute(_SIZES_SQL, {"tf": timeframe, "symbols": list(symbols), "start": start_ts, "end": end_ts})
        return dict(cursor.fetchall())


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WriteCounts:
    inserted: int  # bars at a ts the series did not have
    updated: int  # bars that replaced a stored bar with other values
    series: int  # series changed (each given the import's data version)
    version: int | None  # that version; None if nothing changed


_WRITE_BATCH = 200  # chunks per INSERT statement (a decade of daily bars is 121 KB a chunk)
OnWritten = Callable[[int], object]

_UPSERT_SERIES = """
INSERT INTO bar_series AS h (symbol, timeframe, data_version, bars, first_ts, last_ts, updated_at)
SELECT symbol, %(tf)s, %(version)s, 0, 0, 0, now() FROM unnest(%(symbols)s::varchar[]) AS symbol
ON CONFLICT (symbol, timeframe) DO UPDATE SET data_version = EXCLUDED.data_version, updated_at = now()
"""

# Chunks are written by binary COPY into a staging table of the transaction (bytea as raw bytes: an INSERT's text
# would carry it escaped, twice its size, and cost as much to build as to store), then upserted from it.
_STAGE_CHUNKS = """
CREATE TEMPORARY TABLE IF NOT EXISTS bar_chunks_in (
    symbol varchar(32), timeframe varchar(4), day int4, bars int4, first_ts int8, last_ts int8, data bytea
) ON COMMIT DROP;
ALTER TABLE bar_chunks_in ALTER COLUMN data SET STORAGE EXTERNAL;
TRUNCATE bar_chunks_in
"""
_COPY_CHUNKS = "COPY bar_chunks_in FROM STDIN (FORMAT binary)"
_UPSERT_CHUNKS = """
INSERT INTO bar_chunks (symbol, timeframe, chunk_start, bars, first_ts, last_ts, data)
SELECT symbol, timeframe, DATE '1970-01-01' + day, bars, first_ts, last_ts, data FROM bar_chunks_in
ON CONFLICT (symbol, timeframe, chunk_start) DO UPDATE SET
    bars = EXCLUDED.bars, first_ts = EXCLUDED.first_ts, last_ts = EXCLUDED.last_ts, data = EXCLUDED.data
"""

_SUMMARISE_SERIES = """
UPDATE bar_series h SET bars = c.bars, first_ts = c.first_ts, last_ts = c.last_ts
FROM (
    SELECT symbol, sum(bars)::int AS bars, min(first_ts) AS first_ts, max(last_ts) AS last_ts
    FROM bar_chunks WHERE timeframe = %(tf)s AND symbol = ANY(%(symbols)s::varchar[]) GROUP BY symbol
) c
WHERE h.symbol = c.symbol AND h.timeframe = %(tf)s
"""

_STORED_CHUNKS = """
SELECT c.symbol, c.chunk_start - DATE '1970-01-01', c.bars, c.data
FROM unnest(%(symbols)s::varchar[], %(days)s::int[]) AS k(symbol, day)
JOIN bar_chunks c ON c.symbol = k.symbol AND c.timeframe = %(tf)s AND c.chunk_start = DATE '1970-01-01' + k.day
"""


def write_series(
    cursor: PgCursor,
    timeframe: str,
    incoming: Mapping[str, Columns],
    on_written: OnWritten | None = None,
    version: int | None = None,
) -> WriteCounts:
    """Lay ``incoming`` (per symbol: sorted, no repeated ``ts``, symbols already in ``symbols``) over the stored
    series, in the caller's transaction, which must hold the bar-load lock: chunks that change are rewritten, and
    every series that changed gets one new data version (``version``, an earlier write's of the same import, or the
    next of the sequence). Bars the store has and ``incoming`` lacks are kept. ``on_written`` is told how many of
    ``incoming``'s bars each step has dealt with (a progress bar)."""
    pieces: dict[tuple[str, int], Columns] = {}
    for symbol, columns in incoming.items():
        for first_day, chunk in split_chunks(timeframe, columns):
            pieces[(symbol, first_day)] = chunk
    if not pieces:
        return WriteCounts(0, 0, 0, None)
    keys = list(pieces)
    inserted = updated = 0
    changed: set[str] = set()
    for lo in range(0, len(keys), _WRITE_BATCH):  # a batch of chunks at a time: memory bounded by the batch
        batch = keys[lo : lo + _WRITE_BATCH]
        cursor.execute(
            _STORED_CHUNKS, {"tf": timeframe, "symbols": [s for s, _ in batch], "days": [d for _, d in batch]}
        )
        stored = {(symbol, day): unpack(data, bars) for symbol, day, bars, data in cursor.fetchall()}
        rewrites: list[tuple[str, str, int, int, int, int, bytes]] = []
        for symbol, day in batch:
            result = merge(stored.get((symbol, day), concat([])), pieces[(symbol, day)])
            inserted += result.inserted
            updated += result.updated
            if result.inserted or result.updated:
                ts = result.columns.ts
                rewrites.append((symbol, timeframe, day, len(ts), int(ts[0]), int(ts[-1]), pack(result.columns)))
        if rewrites:
            if version is None:
                cursor.execute("SELECT nextval('bar_data_version')")
                version = int(cursor.fetchone()[0])  # type: ignore[index]
            fresh = sorted({symbol for symbol, *_ in rewrites} - changed)
            cursor.execute(_UPSERT_SERIES, {"tf": timeframe, "version": version, "symbols": fresh})
            changed.update(fresh)
            cursor.execute(_STAGE_CHUNKS)
            db.copy_in(cursor, _COPY_CHUNKS, pgcopy.encode(rewrites, "ttiiqqb"))
            cursor.execute(_UPSERT_CHUNKS)
        if on_written:
            on_written(sum(len(pieces[key]) for key in batch))
    if not changed:
        return WriteCounts(inserted, updated, 0, None)
    cursor.execute(_SUMMARISE_SERIES, {"tf": timeframe, "symbols": sorted(changed)})
    return WriteCounts(inserted, updated, len(changed), version)


@dataclass(frozen=True)
class SymbolInfo:
    """Symbol metadata upserted before the bars (the demo universe marks its symbols synthetic)."""

    symbol: str
    name: str | None = None
    is_synthetic: bool = False


# Serialises bar loads: two imports merging into one chunk must not both read it before either writes.
_LOAD_LOCK_KEY = "alphaforge.bars.load"


def lock_bar_loads(conn: Connection) -> None:
    """Take the bar-load lock for the rest of ``conn``'s transaction (bar and corporate-action imports)."""
    conn.execute(text("SELECT pg_advisory_xact_lock(hashtext(:key))"), {"key": _LOAD_LOCK_KEY})


_UPSERT_SYMBOL_INFO = """
INSERT INTO symbols (symbol, name, is_synthetic)
SELECT * FROM unnest(%s::varchar[], %s::text[], %s::boolean[])
ON CONFLICT (symbol) DO UPDATE SET name = EXCLUDED.name, is_synthetic = EXCLUDED.is_synthetic
"""

_INSERT_MISSING_SYMBOLS = """
INSERT INTO symbols (symbol) SELECT unnest(%s::varchar[]) ON CONFLICT (symbol) DO NOTHING
"""


def import_columns(
    engine: Engine,
    timeframe: str,
    incoming: Mapping[str, Columns],
    *,
    symbols: Sequence[SymbolInfo] = (),
    exchange_tz: str | None = None,
) -> WriteCounts:
    """:func:`store_columns` in a transaction of its own: all of it is stored, or nothing."""
    with engine.begin() as conn:
        return store_columns(conn, timeframe, incoming, symbols=symbols, exchange_tz=exchange_tz)


def store_columns(
    conn: Connection,
    timeframe: str,
    incoming: Mapping[str, Columns],
    *,
    symbols: Sequence[SymbolInfo] = (),
    exchange_tz: str | None = None,
) -> WriteCounts:
    """In ``conn``'s transaction: :class:`BarLoad` of ``incoming`` in one write."""
    load = BarLoad(conn, timeframe, exchange_tz=exchange_tz)
    load.add(incoming, symbols=symbols)
    return load.counts


class BarLoad:
    """One import written in several parts (a file at a time, so that it never holds all of its bars) in the
    caller's transaction: the bar-load lock, taken by the first part, and one data version for all of them. Each
    part creates its unknown symbols, sets their exchange time zone (``exchange_tz``: an IANA name; None keeps it),
    lays its bars over the store (:func:`write_series`) and keeps the symbols' listing dates current."""

    def __init__(self, conn: Connection, timeframe: str, *, exchange_tz: str | None = None) -> None:
        self.conn, self.timeframe, self.exchange_tz = conn, timeframe, exchange_tz
        self.counts = WriteCounts(0, 0, 0, None)
        self._locked = False

    def add(
        self,
        incoming: Mapping[str, Columns],
        *,
        symbols: Sequence[SymbolInfo] = (),
        on_written: OnWritten | None = None,
    ) -> None:
        """Store a part: ``incoming``'s bars, after ``symbols``' metadata (upserted); ``on_written`` as for
        :func:`write_series`."""
        if not self._locked:
            lock_bar_loads(self.conn)
            self._locked = True
        with _cursor(self.conn) as cursor:
            if symbols:
                cursor.execute(
                    _UPSERT_SYMBOL_INFO,
                    ([i.symbol for i in symbols], [i.name for i in symbols], [i.is_synthetic for i in symbols]),
                )
            cursor.execute(_INSERT_MISSING_SYMBOLS, (sorted(incoming),))
            if self.exchange_tz is not None:
                cursor.execute("UPDATE symbols SET exchange_tz = %s WHERE symbol = ANY(%s::varchar[])",
                               (self.exchange_tz, sorted(incoming)))  # fmt: skip
            part = write_series(cursor, self.timeframe, incoming, on_written, self.counts.version)
        listings.refresh_listed_on(self.conn, sorted(incoming))
        done = self.counts
        self.counts = WriteCounts(
            done.inserted + part.inserted,
            done.updated + part.updated,
            done.series + part.series,
            done.version if done.version is not None else part.version,
        )


def columns_of(ts: Any, open: Any, high: Any, low: Any, close: Any, volume: Any) -> Columns:
    """Columns from array-likes (copied into int64 / float64)."""
    return Columns(
        np.asarray(ts, dtype=np.int64),
        *(np.asarray(values, dtype=np.float64) for values in (open, high, low, close, volume)),
    )
