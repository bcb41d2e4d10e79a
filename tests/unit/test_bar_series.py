"""Bars as columns (pure): the stored layout, chunking, how an import merges, and the process's chunk cache."""

from __future__ import annotations

import datetime as dt
import struct

import numpy as np
import pytest

from shared.marketdata import pgcopy, store
from shared.marketdata.bars import SymbolBars
from shared.marketdata.series import (
    BYTES_PER_BAR,
    Columns,
    chunk_start,
    concat,
    day_ts,
    merge,
    pack,
    split_chunks,
    unpack,
)


def _columns(days: list[dt.date], close: list[float] | None = None) -> Columns:
    n = len(days)
    close = close if close is not None else [float(i + 1) for i in range(n)]
    return store.columns_of([day_ts(d) for d in days], close, [c + 1 for c in close], [c / 2 for c in close], close,
                            [1000.0 * (i + 1) for i in range(n)])  # fmt: skip


def _days(start: dt.date, n: int) -> list[dt.date]:
    return [start + dt.timedelta(days=i) for i in range(n)]


def _equal(a: Columns, b: Columns) -> bool:
    return np.array_equal(a.ts, b.ts) and np.array_equal(a.values().view(np.int64), b.values().view(np.int64))


def test_pack_and_unpack_are_exact_and_zero_copy() -> None:
    tricky = [0.1, 1 / 3, 5e-324, 1.7976931348623157e308, 2.0**53]
    columns = _columns(_days(dt.date(2024, 1, 1), 5), tricky)
    data = pack(columns)
    assert len(data) == 5 * BYTES_PER_BAR
    back = unpack(data, 5)
    assert _equal(back, columns)
    assert not back.close.flags.writeable and back.close.base is not None  # a view of the bytes


def test_unpack_refuses_a_chunk_of_the_wrong_size() -> None:
    with pytest.raises(ValueError, match="holds 47 bytes"):
        unpack(b"\0" * 47, 1)


@pytest.mark.parametrize(
    ("timeframe", "day", "first"),
    [
        ("1d", dt.date(2019, 12, 31), dt.date(2010, 1, 1)),
        ("1d", dt.date(2020, 1, 1), dt.date(2020, 1, 1)),
        ("1d", dt.date(1969, 7, 20), dt.date(1960, 1, 1)),
        ("1h", dt.date(2024, 6, 30), dt.date(2024, 1, 1)),
        ("1m", dt.date(2024, 6, 30), dt.date(2024, 6, 1)),
    ],
)
def test_chunks_are_decades_years_or_months(timeframe: str, day: dt.date, first: dt.date) -> None:
    got = chunk_start(timeframe, np.array([day_ts(day) + 3600 * 13], dtype=np.int64))
    assert got.tolist() == [(first - dt.date(1970, 1, 1)).days]


def test_split_chunks_cuts_at_the_boundaries_in_order() -> None:
    columns = _columns(_days(dt.date(2019, 12, 29), 6))
    parts = list(split_chunks("1d", columns))
    assert [(first, len(c)) for first, c in parts] == [(14610, 3), (18262, 3)]  # 2010-01-01, 2020-01-01
    assert _equal(concat([c for _, c in parts]), columns)


def test_merge_into_nothing_inserts_everything() -> None:
    incoming = _columns(_days(dt.date(2024, 1, 1), 3))
    result = merge(concat([]), incoming)
    assert (result.inserted, result.updated) == (3, 0) and _equal(result.columns, incoming)


def test_merge_of_the_same_bars_changes_nothing() -> None:
    stored = _columns(_days(dt.date(2024, 1, 1), 4))
    result = merge(stored, stored.take(1, 3))
    assert (result.inserted, result.updated) == (0, 0)
    assert result.columns is stored


def test_merge_adds_new_bars_replaces_changed_ones_and_keeps_the_rest() -> None:
    stored = _columns(_days(dt.date(2024, 1, 1), 4), [10.0, 11.0, 12.0, 13.0])
    incoming = _columns([dt.date(2023, 12, 31), dt.date(2024, 1, 2), dt.date(2024, 1, 3), dt.date(2024, 1, 9)],
                        [9.0, 11.0, 99.0, 14.0])  # fmt: skip
    result = merge(stored, incoming)  # 01-02 is the stored bar exactly: neither inserted nor updated
    assert (result.inserted, result.updated) == (2, 1)
    got = result.columns
    assert got.ts.tolist() == [day_ts(d) for d in [dt.date(2023, 12, 31), *_days(dt.date(2024, 1, 1), 4),
                                                    dt.date(2024, 1, 9)]]  # fmt: skip
    assert got.close.tolist() == [9.0, 10.0, 11.0, 99.0, 13.0, 14.0]


def test_merge_counts_a_sign_of_zero_as_a_change() -> None:
    stored = _columns([dt.date(2024, 1, 1)])
    flipped = Columns(stored.ts, stored.open, stored.high, stored.low, stored.close, np.array([-0.0]))
    zero = Columns(stored.ts, stored.open, stored.high, stored.low, stored.close, np.array([0.0]))
    assert merge(zero, flipped).updated == 1


def test_between_trims_by_ts_inclusive() -> None:
    columns = _columns(_days(dt.date(2024, 1, 1), 5))
    cut = columns.between(day_ts(dt.date(2024, 1, 2)), day_ts(dt.date(2024, 1, 4)))
    assert cut.close.tolist() == [2.0, 3.0, 4.0]
    assert len(columns.between(day_ts(dt.date(2025, 1, 1)), None)) == 0
    assert columns.between(None, None) is columns


def test_symbol_bars_give_iso_dates_and_days() -> None:
    bars = SymbolBars.of("A", _columns([dt.date(2024, 2, 28), dt.date(2024, 2, 29)]))
    assert bars.dates == ("2024-02-28", "2024-02-29")
    assert bars.days.tolist() == [dt.date(2024, 2, 28), dt.date(2024, 2, 29)]
    again = SymbolBars.from_dates("A", bars.dates, bars.open, bars.high, bars.low, bars.close, bars.volume)
    assert np.array_equal(again.ts, bars.ts)


# -- the chunk cache ---------------------------------------------------------------------------------


def _chunk(n: int) -> Columns:
    return _columns(_days(dt.date(2024, 1, 1), n))


def test_cache_is_bounded_in_bytes_and_evicts_the_least_recently_used() -> None:
    cache = store.ChunkCache(max_bytes=3 * 10 * BYTES_PER_BAR)
    for symbol in "ABC":
        cache.put((symbol, "1d", 0, 1), _chunk(10))
    assert cache.get(("A", "1d", 0, 1)) is not None  # A is now the most recent
    cache.put(("D", "1d", 0, 1), _chunk(10))
    assert cache.bytes <= cache.max_bytes and len(cache) == 3
    assert cache.get(("B", "1d", 0, 1)) is None and cache.get(("A", "1d", 0, 1)) is not None


def test_a_newer_version_evicts_the_series_older_chunks() -> None:
    cache = store.ChunkCache(max_bytes=10**6)
    cache.put(("A", "1d", 0, 1), _chunk(5))
    cache.put(("A", "1d", 3650, 1), _chunk(5))
    cache.put(("B", "1d", 0, 1), _chunk(5))
    cache.put(("A", "1d", 0, 2), _chunk(5))
    assert cache.get(("A", "1d", 3650, 1)) is None and cache.get(("A", "1d", 0, 1)) is None
    assert cache.get(("A", "1d", 0, 2)) is not None and cache.get(("B", "1d", 0, 1)) is not None
    cache.put(("A", "1d", 3650, 1), _chunk(5))  # a late reader of the old version does not bring it back
    assert cache.get(("A", "1d", 3650, 1)) is None
    assert cache.bytes == 2 * 5 * BYTES_PER_BAR


def test_a_zero_cache_holds_nothing() -> None:
    cache = store.ChunkCache(0)
    cache.put(("A", "1d", 0, 1), _chunk(1))
    assert len(cache) == 0 and cache.get(("A", "1d", 0, 1)) is None


# -- binary COPY output ------------------------------------------------------------------------------------------


def _copy_stream(rows: list[list[bytes | None]]) -> memoryview:
    out = b"PGCOPY\n\xff\r\n\x00" + struct.pack("!ii", 0, 0)
    for row in rows:
        out += struct.pack("!h", len(row))
        for value in row:
            out += struct.pack("!i", -1) if value is None else struct.pack("!i", len(value)) + value
    return memoryview(out + struct.pack("!h", -1))


def test_binary_copy_rows_decode_to_values_and_bytes_of_their_own() -> None:
    stream = _copy_stream([[b"BRK.B", struct.pack("!q", 2**40), struct.pack("!i", -3), b"\x00\x01"],
                           [b"A", struct.pack("!q", 1), None, b""]])  # fmt: skip
    rows = pgcopy.decode(stream, "tqib")
    assert rows == [("BRK.B", 2**40, -3, b"\x00\x01"), ("A", 1, None, b"")]
    assert type(rows[0][3]) is bytes  # not a view that keeps the whole stream alive


def test_binary_copy_of_other_shapes_is_refused() -> None:
    with pytest.raises(pgcopy.CopyFormatError, match="not PostgreSQL binary COPY"):
        pgcopy.decode(memoryview(b"symbol,date\n"), "t")
    with pytest.raises(pgcopy.CopyFormatError, match="a row of 1 fields, expected 2"):
        pgcopy.decode(_copy_stream([[b"A"]]), "tq")


def test_binary_copy_rows_encode_and_decode_back_exactly() -> None:
    rows = [("AAPL", "1d", -3, 2**31 - 1, -(2**63), 2**63 - 1, bytes(range(256))), ("É", "", 0, 0, 0, 0, b""),
            ("N", None, None, 1, 2, 3, None)]  # fmt: skip
    assert pgcopy.decode(memoryview(pgcopy.encode(rows, "ttiiqqb")), "ttiiqqb") == rows
