"""The column store against a real PostgreSQL: exact round trips, data versions, the chunk cache, a read that an
import commits into, and a run identified by the data it is computed on."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from flask.testing import FlaskClient
from sqlalchemy import Engine, text

from shared.infra.db import install_deadlines
from shared.marketdata import store
from shared.marketdata.bars import data_stamp, load_bars
from shared.marketdata.series import DEFAULT_TIMEFRAME, Columns, day_ts
from tests.helpers import copy_bars, seed_bars, wait_for_job

RNG = np.random.default_rng(5)


def _series(first: dt.date, n: int) -> Columns:
    days = np.busday_offset(np.datetime64(first, "D"), np.arange(n), roll="forward")
    close = 100 * np.exp(np.cumsum(RNG.normal(0, 0.02, n)))
    return store.columns_of(days.astype(np.int64) * 86_400, close * 0.999, close * 1.01, close * 0.98, close,
                            RNG.integers(1, 10**6, n).astype(float))  # fmt: skip


def _bitwise(a: Columns, b: Columns) -> bool:
    return np.array_equal(a.ts, b.ts) and np.array_equal(a.values().view(np.int64), b.values().view(np.int64))


def _read(engine: Engine, symbols: list[str], **kwargs: Any) -> dict[str, store.Series]:
    with engine.connect() as conn:
        return store.read_series(conn, symbols, DEFAULT_TIMEFRAME, cache=kwargs.pop("cache", store.ChunkCache(0)),
                                 **kwargs)  # fmt: skip


def _versions(engine: Engine) -> dict[str, int]:
    with engine.connect() as conn:
        return {
            symbol: version for symbol, version in conn.execute(text("SELECT symbol, data_version FROM bar_series"))
        }


@pytest.fixture(params=["select", "copy"])
def read_by(request: pytest.FixtureRequest) -> Iterator[str]:
    """Both ways a read fetches chunks: SELECT (the API's processes) and binary COPY under the wait callback (the
    workers')."""
    if request.param == "copy":
        install_deadlines()
    store.configure(256, copy=request.param == "copy")
    try:
        yield request.param
    finally:
        store.configure(256, copy=False)


def test_import_then_read_is_bit_for_bit_across_chunks_and_ranges(
    clean_db: Engine, read_by: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store, "FETCH_BATCH", 3)  # four chunks: two statements
    universe = {"A": _series(dt.date(2015, 3, 2), 2000), "BRK.B": _series(dt.date(2019, 12, 2), 40)}
    counts = store.import_columns(clean_db, DEFAULT_TIMEFRAME, universe)
    assert (counts.inserted, counts.updated, counts.series) == (2040, 0, 2)
    got = _read(clean_db, ["A", "BRK.B", "NOPE"])
    assert set(got) == {"A", "BRK.B"} and all(_bitwise(got[s].columns, universe[s]) for s in universe)
    with clean_db.connect() as conn:
        chunks = conn.execute(text("SELECT symbol, chunk_start FROM bar_chunks ORDER BY 1, 2")).all()
    assert [tuple(c) for c in chunks] == [("A", dt.date(2010, 1, 1)), ("A", dt.date(2020, 1, 1)),
                                          ("BRK.B", dt.date(2010, 1, 1)), ("BRK.B", dt.date(2020, 1, 1))]  # fmt: skip
    start, end = day_ts(dt.date(2019, 12, 20)), day_ts(dt.date(2020, 1, 10))
    ranged = _read(clean_db, ["A", "BRK.B"], start_ts=start, end_ts=end)
    for symbol, series in universe.items():
        assert _bitwise(ranged[symbol].columns, series.between(start, end))
    assert _read(clean_db, ["A"], start_ts=day_ts(dt.date(2031, 1, 1))) == {}


def test_versions_move_only_with_the_bars(clean_db: Engine) -> None:
    universe = {"A": _series(dt.date(2020, 1, 2), 50), "B": _series(dt.date(2020, 1, 2), 50)}
    first = store.import_columns(clean_db, DEFAULT_TIMEFRAME, universe)
    before = _versions(clean_db)
    assert before == {"A": first.version, "B": first.version}

    again = store.import_columns(clean_db, DEFAULT_TIMEFRAME, universe)  # the same bars: nothing changes
    assert (again.inserted, again.updated, again.series, again.version) == (0, 0, 0, None)
    assert _versions(clean_db) == before

    changed = universe["B"].values().copy()
    changed[3, 10] *= 1.001  # one close of B
    fix = store.import_columns(
        clean_db, DEFAULT_TIMEFRAME, {"A": universe["A"], "B": Columns.from_values(universe["B"].ts, changed)}
    )
    assert (fix.inserted, fix.updated, fix.series) == (0, 1, 1)
    after = _versions(clean_db)
    assert after["A"] == before["A"] and fix.version is not None and after["B"] == fix.version > before["B"]
    assert _read(clean_db, ["B"])["B"].columns.close[10] == changed[3, 10]


def test_the_cache_serves_repeat_reads_and_an_import_invalidates_it(clean_db: Engine) -> None:
    store.import_columns(clean_db, DEFAULT_TIMEFRAME, {"A": _series(dt.date(2020, 1, 2), 30)})
    cache = store.ChunkCache(10**7)
    first = _read(clean_db, ["A"], cache=cache)["A"]
    misses = cache.misses
    assert _read(clean_db, ["A"], cache=cache)["A"].columns.close is first.columns.close  # the cached arrays
    assert cache.misses == misses
    newer = _series(dt.date(2020, 1, 2), 30)
    store.import_columns(clean_db, DEFAULT_TIMEFRAME, {"A": newer})
    fresh = _read(clean_db, ["A"], cache=cache)["A"]
    assert fresh.version > first.version and _bitwise(fresh.columns, newer)
    assert cache.bytes == 30 * 48  # the old version's chunk is gone


class _ImportOnFirstLook(store.ChunkCache):
    """A cache that, the first time a read looks into it (between the read's two statements), commits an import."""

    def __init__(self, engine: Engine, incoming: dict[str, Columns]) -> None:
        super().__init__(10**7)
        self.engine, self.incoming, self.imported = engine, incoming, False

    def get(self, key: store.ChunkKey) -> Columns | None:
        if not self.imported:
            self.imported = True
            store.import_columns(self.engine, DEFAULT_TIMEFRAME, self.incoming)
        return super().get(key)


def test_a_read_that_an_import_commits_into_returns_one_committed_version(clean_db: Engine) -> None:
    old = {"A": _series(dt.date(2020, 1, 2), 40), "B": _series(dt.date(2020, 1, 2), 40)}
    store.import_columns(clean_db, DEFAULT_TIMEFRAME, old)
    new = {"A": _series(dt.date(2020, 1, 2), 40), "B": _series(dt.date(2020, 1, 2), 40)}
    cache = _ImportOnFirstLook(clean_db, new)
    got = _read(clean_db, ["A", "B"], cache=cache)
    assert cache.imported
    versions = _versions(clean_db)
    for symbol in ("A", "B"):  # the import's state of both, not the old one nor a mix
        assert got[symbol].version == versions[symbol] and _bitwise(got[symbol].columns, new[symbol])


def test_load_bars_gives_the_version_and_the_dates(clean_db: Engine) -> None:
    store.import_columns(clean_db, DEFAULT_TIMEFRAME, {"A": _series(dt.date(2024, 2, 28), 3)})
    with clean_db.connect() as conn:
        bars = load_bars(conn, ["A"], dt.date(2024, 2, 29), None)["A"]
        stamp = data_stamp(conn, ["A", "NOBARS"])
    assert bars.dates == ("2024-02-29", "2024-03-01") and bars.version == _versions(clean_db)["A"]
    assert stamp.version == bars.version and len(stamp.sha256) == 64


def test_a_reimport_that_changes_bars_makes_the_same_run_config_a_new_run(
    clean_db: Engine, client: FlaskClient, celery_worker: Any
) -> None:
    rows = seed_bars(clean_db, ["DV1", "DV2"], days=80)
    body = {"symbols": ["DV1", "DV2"], "strategy": {"name": "dual_sma", "params": {"fast": 5, "slow": 20}}}
    first = client.post("/api/runs", json=body)
    assert first.status_code == 202 and first.headers["Idempotent-Replayed"] == "false", first.get_json()
    same = client.post("/api/runs", json=body)  # unchanged data: the same run
    assert same.status_code == 200 and same.get_json()["run_id"] == first.get_json()["run_id"]

    bumped = dict(rows["DV2"][-1], close=rows["DV2"][-1]["close"] * 1.05)
    bumped["high"] = max(bumped["high"], bumped["close"])
    with clean_db.begin() as conn:
        copy_bars(conn, [bumped])
    second = client.post("/api/runs", json=body)
    assert second.status_code == 202 and second.headers["Idempotent-Replayed"] == "false", second.get_json()
    assert second.get_json()["run_id"] != first.get_json()["run_id"]
    views = [client.get(f"/api/runs/{r.get_json()['run_id']}").get_json() for r in (first, second)]
    assert views[0]["config_hash"] == views[1]["config_hash"]  # the same config ...
    assert views[0]["data_sha256"] != views[1]["data_sha256"]  # ... on other data
    assert views[1]["data_version"] > views[0]["data_version"]


def test_a_job_is_stamped_with_its_data_and_each_result_with_the_version_it_read(
    clean_db: Engine, client: FlaskClient, celery_worker: Any
) -> None:
    rows = seed_bars(clean_db, ["V1", "V2"], days=30)
    with clean_db.begin() as conn:  # V2 re-imported: a newer version than V1's
        copy_bars(conn, [dict(rows["V2"][0], volume=rows["V2"][0]["volume"] + 1)])
    versions = _versions(clean_db)
    assert versions["V2"] > versions["V1"]
    body = {"script": "result = close[-1]", "column_name": "c", "stock_symbols": ["V1", "V2", "V3NONE"]}
    with clean_db.begin() as conn:
        conn.execute(text("INSERT INTO symbols (symbol) VALUES ('V3NONE')"))
    accepted = client.post("/api/custom-calculations/execute", json=body)
    assert accepted.status_code == 202, accepted.get_json()
    job = wait_for_job(client, accepted.get_json()["job_id"])
    assert job["reproducibility"]["data_version"] == versions["V2"]
    with clean_db.connect() as conn:
        stamp = data_stamp(conn, ["V1", "V2", "V3NONE"])
        found = conn.execute(
            text("SELECT symbol, data_version FROM job_results WHERE job_id = :j"), {"j": job["job_id"]}
        )
        read = {symbol: version for symbol, version in found}
    assert job["reproducibility"]["data_sha256"] == stamp.sha256
    assert read == {"V1": versions["V1"], "V2": versions["V2"], "V3NONE": None}  # no bars: nothing read


def test_sizes_count_the_bars_of_the_chunks_a_range_meets_from_metadata(clean_db: Engine) -> None:
    """Two decade chunks (2008-2009, 2010-2011): a range in the second counts its chunk's bars only."""
    bars = _series(dt.date(2008, 1, 1), 1000)  # business days: 2008-01-01 .. 2011-10
    store.import_columns(clean_db, DEFAULT_TIMEFRAME, {"SZ": bars})
    with clean_db.connect() as conn:
        whole = store.sizes(conn, ["SZ", "NONE"], DEFAULT_TIMEFRAME)
        later = store.sizes(conn, ["SZ"], DEFAULT_TIMEFRAME, day_ts(dt.date(2011, 1, 1)), None)
        earlier = store.sizes(conn, ["SZ"], DEFAULT_TIMEFRAME, None, day_ts(dt.date(2009, 6, 1)))
    in_2010s = int((bars.ts >= day_ts(dt.date(2010, 1, 1))).sum())
    assert whole == {"SZ": 1000} and 0 < in_2010s < 1000
    assert later == {"SZ": in_2010s} and earlier == {"SZ": 1000 - in_2010s}
