"""Reading bars: the product's read path against the row loader it replaced and against Parquet, same run.

    .venv/bin/python -m benchmarks.bar_loading [--symbols 1000] [--bars 2520] [--rounds 5]

Loads a seeded synthetic universe (embedded PostgreSQL unless ALPHAFORGE_BENCH_DATABASE_URL names a server) and
times reading every symbol's bars into per-symbol float64 arrays, three ways:

* ``store (cold, COPY)``: ``shared.marketdata.bars.load_bars`` as a worker process reads, with an empty chunk cache
  (two statements: metadata, then the chunks' bytes by binary COPY);
* ``store (cold, SELECT)``: the same as the API's processes read (the bytes by SELECT, hex on the wire);
* ``store (warm)``: with this process's cache holding the chunks (one metadata statement);
* ``row loader``: the reference, the loader this product had before the column store, kept here verbatim over a
  ``daily_bars``-shaped table of the same bars (one row a bar, parsed in Python);
* ``parquet``: ``pyarrow.parquet.read_table`` of a local file of the same columns, split per symbol into arrays.

This process installs the deadline wait callback of the API's and workers' processes (shared/infra/db.py), so
every read here is bounded as theirs are. It also times the import of those bars into an empty store (bars per
second). Machines here are shared and noisy: read the ratios, measured in one run, not the absolute times.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from sqlalchemy import text

from benchmarks.row_loader import create_row_table, row_loader
from benchmarks.stack import bench_stack, write_parquet
from shared.infra.db import install_deadlines, make_engine
from shared.marketdata import store
from shared.marketdata.bars import load_bars
from shared.marketdata.demo import generate_demo_bars, series_columns
from shared.marketdata.series import DEFAULT_TIMEFRAME
from shared.marketdata.table_import import import_path


def parquet_loader(path: Path) -> dict[str, tuple[np.ndarray, ...]]:
    """A local Parquet file of (symbol, ts, open, high, low, close, volume), sorted by symbol and ts, as arrays."""
    table = pq.read_table(path)
    symbols = table.column("symbol").to_numpy()
    columns = [table.column(name).to_numpy() for name in ("ts", "open", "high", "low", "close", "volume")]
    edges = [0, *(np.flatnonzero(symbols[1:] != symbols[:-1]) + 1).tolist(), len(symbols)]
    return {str(symbols[lo]): tuple(c[lo:hi] for c in columns) for lo, hi in itertools.pairwise(edges)}


def timed(fn: Callable[[], Any], rounds: int) -> tuple[float, Any]:
    times, result = [], None
    for _ in range(rounds):
        began = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - began)
    return statistics.median(times), result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--symbols", type=int, default=1000)
    parser.add_argument("--bars", type=int, default=2520)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    years = -(-args.bars // 252)
    universe = {s.symbol: series_columns(s) for s in generate_demo_bars(args.symbols, years, seed=1)}
    universe = {symbol: c.take(len(c) - args.bars, len(c)) for symbol, c in universe.items()}
    symbols = sorted(universe)
    total = sum(len(c) for c in universe.values())

    with bench_stack("bars") as stack, tempfile.TemporaryDirectory() as scratch:
        engine = make_engine(stack.database_url, pool_size=1)
        began = time.perf_counter()
        counts = store.import_columns(engine, DEFAULT_TIMEFRAME, universe)
        import_s = time.perf_counter() - began
        assert counts.inserted == total, counts
        create_row_table(engine, universe)  # the reference's table: the same bars, one row each
        parquet = Path(scratch) / "bars.parquet"
        write_parquet(parquet, universe)

        install_deadlines()
        with engine.connect() as conn:

            def cold(copy: bool) -> Any:
                store.configure(256, copy=copy).clear()
                return load_bars(conn, symbols, None, None)

            select_s, by_select = timed(lambda: cold(False), args.rounds)
            cold_s, got = timed(lambda: cold(True), args.rounds)
            warm_s, _ = timed(lambda: load_bars(conn, symbols, None, None), args.rounds)
            rows_s, reference = timed(lambda: row_loader(conn, symbols), max(1, args.rounds // 2))
        parquet_s, from_parquet = timed(lambda: parquet_loader(parquet), args.rounds)
        # `bars import` of a Parquet file of the same bars (the importer's columns, dates as dates) into an empty store
        to_import = Path(scratch) / "import.parquet"
        write_parquet(to_import, universe, dates=True)
        imports = []
        for _ in range(max(1, args.rounds // 2)):  # each into an empty store
            with engine.begin() as conn:
                conn.execute(text("DELETE FROM bar_series"))
            began = time.perf_counter()
            report = import_path(engine, to_import)
            imports.append(time.perf_counter() - began)
            assert report.inserted == total, report
        parquet_import_s = statistics.median(imports)
        engine.dispose()

    for symbol in symbols:  # the readers return the same bars
        mine, theirs, pq_cols = got[symbol], reference[symbol], from_parquet[symbol]
        assert np.array_equal(mine.ts, by_select[symbol].ts) and np.array_equal(mine.close, by_select[symbol].close)
        assert mine.dates == theirs[0] and all(
            np.array_equal(getattr(mine, name), np.frombuffer(col, dtype=np.float64))
            for name, col in zip(("open", "high", "low", "close", "volume"), theirs[1:], strict=True)
        ), symbol
        assert np.array_equal(mine.ts, pq_cols[0]) and np.array_equal(mine.close, pq_cols[4]), symbol

    print(f"{args.symbols} symbols x {args.bars} bars = {total:,} bars, median of {args.rounds} rounds")
    print(
        f"  import into an empty store  {import_s:8.3f} s   {total / import_s / 1e6:6.2f} M bars/s  (columns in memory)"
    )
    print(f"  bars import of a Parquet    {parquet_import_s:8.3f} s   {total / parquet_import_s / 1e6:6.2f} M bars/s  "
          "(read, validated, stored; goal >= 1 M bars/s)")  # fmt: skip
    for name, seconds in (("store (cold, COPY)", cold_s), ("store (cold, SELECT)", select_s),
                          ("store (warm cache)", warm_s), ("row loader", rows_s),
                          ("parquet (pyarrow)", parquet_s)):  # fmt: skip
        print(f"  {name:<26}  {seconds:8.3f} s   {total / seconds / 1e6:6.2f} M bars/s")
    print(f"  row loader / store (cold)   {rows_s / cold_s:6.1f}x   (goal >= 30x)")
    print(f"  store (cold) / parquet      {cold_s / parquet_s:6.2f}x   (goal <= 3x)")
    print(f"  row loader / store (SELECT) {rows_s / select_s:6.1f}x   (the API's path)")
    print(f"  row loader / store (warm)   {rows_s / warm_s:6.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
