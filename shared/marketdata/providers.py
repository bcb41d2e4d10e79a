"""Where bars come from: a provider reads stored series, and every reader reaches it through ``bars.load_bars``.

A provider serves *stored* timeframes (``series.TIMEFRAME_SECONDS``); resampling to coarser ones, corporate-action
adjustment and the symbols' metadata are the read path's, the same whichever provider is configured
(``ALPHAFORGE_BAR_PROVIDER``). Adding a vendor feed is one class with :class:`BarProvider`'s three methods.

* :class:`StoreProvider` (``store``, the default): the column store in PostgreSQL (shared/marketdata/store.py).
* :class:`ParquetDirectoryProvider` (``parquet``): a directory read in place, no import:
  ``ROOT/TIMEFRAME/SYMBOL.parquet`` (or ``.csv``), and, for daily bars, ``ROOT/SYMBOL.parquet`` too; each file in a
  format ``bars import`` takes, validated by the importer's rules when it is read (a bad file is an error naming
  it, never bars half-read). A file's data version is derived from its size and modification time, so a rewritten
  file is a new version (runs on it are new runs) and each process re-reads it.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from sqlalchemy import Connection

from shared.marketdata import store
from shared.marketdata.series import BYTES_PER_BAR, DEFAULT_TIMEFRAME, Columns, concat
from shared.marketdata.store import Series

PROVIDERS = ("store", "parquet")


class BarProvider(Protocol):
    """Reads stored series. ``conn`` is the caller's database connection (a provider may not need it)."""

    def read(
        self, conn: Connection, symbols: Sequence[str], timeframe: str, start_ts: int | None, end_ts: int | None
    ) -> dict[str, Series]:
        """Each symbol's bars with ``start_ts <= ts <= end_ts`` at one version (symbols without bars absent)."""
        ...

    def versions(self, conn: Connection, symbols: Sequence[str], timeframe: str) -> dict[str, int]:
        """The current data version of each of ``symbols`` that has bars at ``timeframe``."""
        ...

    def sizes(
        self, conn: Connection, symbols: Sequence[str], timeframe: str, start_ts: int | None, end_ts: int | None
    ) -> dict[str, int]:
        """At most how many bars each of ``symbols`` has at ``timeframe`` in [start_ts, end_ts] (what sizes a read's
        batches; symbols without bars absent)."""
        ...


class StoreProvider:
    """The PostgreSQL column store, through this process's chunk cache."""

    def read(
        self, conn: Connection, symbols: Sequence[str], timeframe: str, start_ts: int | None, end_ts: int | None
    ) -> dict[str, Series]:
        return store.read_series(conn, symbols, timeframe, start_ts, end_ts)

    def versions(self, conn: Connection, symbols: Sequence[str], timeframe: str) -> dict[str, int]:
        return store.versions(conn, symbols, timeframe)

    def sizes(
        self, conn: Connection, symbols: Sequence[str], timeframe: str, start_ts: int | None, end_ts: int | None
    ) -> dict[str, int]:
        return store.sizes(conn, symbols, timeframe, start_ts, end_ts)


class ProviderError(RuntimeError):
    """A provider's source cannot be read (the message names the file and the problem)."""


@dataclass(frozen=True)
class _FileKey:
    path: str
    size: int
    mtime_ns: int

    @property
    def version(self) -> int:
        """A positive 62-bit number that changes when the file does (its size or modification time)."""
        digest = hashlib.sha256(f"{self.path}\n{self.size}\n{self.mtime_ns}".encode()).digest()
        return int.from_bytes(digest[:8], "big") >> 2 or 1


class ParquetDirectoryProvider:
    """Per-symbol files under ``root`` read in place (see the module's docstring); decoded files are kept in a cache
    bounded by ``cache_bytes`` and keyed by the file's version."""

    SUFFIXES = (".parquet", ".csv")

    def __init__(self, root: Path, cache_bytes: int = 256 * 1024 * 1024) -> None:
        self.root = root
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict[_FileKey, Columns] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def _file(self, symbol: str, timeframe: str) -> Path | None:
        folders = [self.root / timeframe] + ([self.root] if timeframe == DEFAULT_TIMEFRAME else [])
        for folder in folders:
            for suffix in self.SUFFIXES:
                path = folder / f"{symbol}{suffix}"
                if path.is_file():
                    return path
        return None

    def _key(self, symbol: str, timeframe: str) -> _FileKey | None:
        path = self._file(symbol, timeframe)
        if path is None:
            return None
        stat = path.stat()
        return _FileKey(str(path), stat.st_size, stat.st_mtime_ns)

    def versions(self, conn: Connection, symbols: Sequence[str], timeframe: str) -> dict[str, int]:
        keys = {symbol: self._key(symbol, timeframe) for symbol in symbols}
        return {symbol: key.version for symbol, key in keys.items() if key is not None}

    def sizes(
        self, conn: Connection, symbols: Sequence[str], timeframe: str, start_ts: int | None, end_ts: int | None
    ) -> dict[str, int]:
        import pyarrow.parquet as pq  # only this provider's processes pay for pyarrow

        out = {}  # the files' bars: a bound of any range's
        for symbol in symbols:
            key = self._key(symbol, timeframe)
            if key is not None:
                suffix = Path(key.path).suffix
                out[symbol] = (
                    pq.read_metadata(key.path).num_rows
                    if suffix == ".parquet"
                    else len(self._columns(symbol, timeframe, key))
                )
        return out

    def read(
        self, conn: Connection, symbols: Sequence[str], timeframe: str, start_ts: int | None, end_ts: int | None
    ) -> dict[str, Series]:
        out: dict[str, Series] = {}
        for symbol in symbols:
            key = self._key(symbol, timeframe)
            if key is None:
                continue
            columns = self._columns(symbol, timeframe, key).between(start_ts, end_ts)
            if len(columns):
                out[symbol] = Series(key.version, columns)
        return out

    def _columns(self, symbol: str, timeframe: str, key: _FileKey) -> Columns:
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        from shared.marketdata.csv_import import BarsImportError
        from shared.marketdata.table_import import read_file

        try:
            read = read_file(Path(key.path), timeframe=timeframe, tz="UTC")
        except BarsImportError as exc:
            raise ProviderError(f"bars of {symbol} at {timeframe}: {exc}") from None
        found = read.columns.get(symbol)
        if read.timeframe != timeframe or found is None or len(read.columns) != 1:
            raise ProviderError(f"{key.path}: holds {', '.join(sorted(read.columns)) or 'no bars'} at "
                                f"{read.timeframe}, not {symbol} at {timeframe}")  # fmt: skip
        columns = concat([found])
        size = len(columns) * BYTES_PER_BAR
        with self._lock:
            if size <= self.cache_bytes and key not in self._cache:
                self._cache[key] = columns
                self._bytes += size
                while self._bytes > self.cache_bytes:
                    _, evicted = self._cache.popitem(last=False)
                    self._bytes -= len(evicted) * BYTES_PER_BAR
        return columns


_provider: BarProvider = StoreProvider()


def configure(name: str, parquet_dir: Path | None = None, cache_mb: int = 256) -> BarProvider:
    """This process's provider (``ALPHAFORGE_BAR_PROVIDER``, ``ALPHAFORGE_BAR_PARQUET_DIR``)."""
    global _provider
    if name == "store":
        _provider = StoreProvider()
    elif name == "parquet":
        if parquet_dir is None:
            raise ValueError("the parquet bar provider needs ALPHAFORGE_BAR_PARQUET_DIR")
        _provider = ParquetDirectoryProvider(parquet_dir, cache_mb * 1024 * 1024)
    else:
        raise ValueError(f"unknown bar provider {name!r} (one of {', '.join(PROVIDERS)})")
    return _provider


def current() -> BarProvider:
    return _provider
