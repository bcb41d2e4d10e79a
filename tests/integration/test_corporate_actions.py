"""Corporate actions and listing ranges against a real PostgreSQL: the actions import (CSV and Parquet, round trip,
bad rows named, all or nothing, idempotent, data versions), the CLI, listings as of a date and universes taken as
of a date through the API."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from flask.testing import FlaskClient
from sqlalchemy import Engine, text

from api.universes import Timeframe
from shared.infra.config import Settings
from shared.library import universes
from shared.marketdata import store
from shared.marketdata.actions import import_actions, read_actions
from shared.marketdata.csv_import import BarsImportError
from shared.marketdata.listings import Listing, listed_as_of, listings, refresh_listed_on
from shared.marketdata.series import Columns

PROJECT_ROOT = Path(__file__).resolve().parents[2]
UNIVERSES = "/api/universes"


def _bars(first: dt.date, n: int, *, step_s: int = 86_400) -> Columns:
    start = int((first - dt.date(1970, 1, 1)).days) * 86_400
    ts = start + step_s * np.arange(n, dtype=np.int64)
    close = np.linspace(100.0, 110.0, n)
    return store.columns_of(ts, close, close * 1.01, close * 0.99, close, np.full(n, 1000.0))


def _load(engine: Engine, bars: dict[str, tuple[dt.date, int]], timeframe: str = "1d") -> None:
    step = 3600 if timeframe == "1h" else 86_400
    store.import_columns(engine, timeframe, {s: _bars(first, n, step_s=step) for s, (first, n) in bars.items()})


def _versions(engine: Engine) -> dict[tuple[str, str], int]:
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT symbol, timeframe, data_version FROM bar_series"))
        return {(symbol, tf): version for symbol, tf, version in rows}


def _actions(engine: Engine, symbols: list[str]) -> dict[str, dict[str, list[tuple[str, float]]]]:
    """read_actions as plain lists: per symbol, split and dividend (ISO day, value) pairs."""
    with engine.connect() as conn:
        found = read_actions(conn, symbols)

    def pairs(days: Any, values: Any) -> list[tuple[str, float]]:
        assert days.dtype == np.int64 and values.dtype == np.float64
        return [(str(np.datetime64(int(d), "D")), float(v)) for d, v in zip(days, values, strict=True)]

    return {
        s: {"split": pairs(a.split_days, a.split_ratios), "dividend": pairs(a.dividend_days, a.dividend_amounts)}
        for s, a in found.items()
    }


def _delisted(engine: Engine) -> dict[str, dt.date | None]:
    with engine.connect() as conn:
        return {symbol: day for symbol, day in conn.execute(text("SELECT symbol, delisted_on FROM symbols"))}


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


GOOD = [
    "Symbol,Ex-Date,Type,Value",
    "AAA,2024-01-10,split,4",
    "AAA,2024-01-05,dividend,0.25",
    "AAA,2024-01-03,dividend,0.1",
    "BBB,2024-01-08,SPLIT,0.1",
    "bbb,2024-01-12,delist,",
]


def _counts(report: Any) -> tuple[int, ...]:
    return report.rows, report.inserted, report.updated, report.unchanged, report.versioned_symbols


def test_a_csv_file_round_trips_and_a_second_import_changes_nothing(clean_db: Engine, tmp_path: Path) -> None:
    _load(
        clean_db, {"AAA": (dt.date(2024, 1, 2), 20), "BBB": (dt.date(2024, 1, 2), 20), "CCC": (dt.date(2024, 1, 2), 5)}
    )
    _load(clean_db, {"AAA": (dt.date(2024, 1, 2), 30)}, timeframe="1h")
    before = _versions(clean_db)
    file = _write(tmp_path / "actions.csv", GOOD)

    report = import_actions(clean_db, file)
    assert _counts(report) == (5, 5, 0, 0, 2) and report.symbols == 2 and report.version is not None
    assert _actions(clean_db, ["AAA", "BBB", "CCC"]) == {
        "AAA": {"split": [("2024-01-10", 4.0)], "dividend": [("2024-01-03", 0.1), ("2024-01-05", 0.25)]},
        "BBB": {"split": [("2024-01-08", 0.1)], "dividend": []},
        "CCC": {"split": [], "dividend": []},
    }
    assert _delisted(clean_db) == {"AAA": None, "BBB": dt.date(2024, 1, 12), "CCC": None}
    # Every series of a symbol whose actions changed takes the import's one version; the others keep theirs.
    after = _versions(clean_db)
    assert after == {**before, ("AAA", "1d"): report.version, ("AAA", "1h"): report.version,
                     ("BBB", "1d"): report.version}  # fmt: skip
    assert report.version > max(before.values())

    again = import_actions(clean_db, file)
    assert _counts(again) == (5, 0, 0, 5, 0) and again.version is None
    assert _versions(clean_db) == after


def test_a_changed_value_moves_only_that_symbols_versions_and_a_delisting_none(
    clean_db: Engine, tmp_path: Path
) -> None:
    _load(clean_db, {"AAA": (dt.date(2024, 1, 2), 20), "BBB": (dt.date(2024, 1, 2), 20)})
    import_actions(clean_db, _write(tmp_path / "a.csv", GOOD))
    before = _versions(clean_db)
    corrected = [GOOD[0], "AAA,2024-01-10,split,4", "AAA,2024-01-05,dividend,0.26", "BBB,2024-01-15,delist,"]
    report = import_actions(clean_db, _write(tmp_path / "b.csv", corrected))
    assert _counts(report) == (3, 0, 2, 1, 1)
    assert _versions(clean_db) == {("AAA", "1d"): report.version, ("BBB", "1d"): before[("BBB", "1d")]}
    # Actions the file lacks are kept; the changed value and the moved delisting are what is stored now.
    assert _actions(clean_db, ["AAA"])["AAA"]["dividend"] == [("2024-01-03", 0.1), ("2024-01-05", 0.26)]
    assert _delisted(clean_db)["BBB"] == dt.date(2024, 1, 15)


def test_replace_makes_the_file_its_symbols_whole_history(clean_db: Engine, tmp_path: Path) -> None:
    """A vendor's correction moves a split's date: without --replace both dates would be stored."""
    _load(clean_db, {"AAA": (dt.date(2024, 1, 2), 20), "BBB": (dt.date(2024, 1, 2), 20)})
    import_actions(clean_db, _write(tmp_path / "a.csv", GOOD))
    before = _versions(clean_db)
    corrected = [GOOD[0], "AAA,2024-01-11,split,4", "AAA,2024-01-05,dividend,0.25", "BBB,2024-01-08,split,0.1"]
    report = import_actions(clean_db, _write(tmp_path / "b.csv", corrected), replace=True)
    assert (report.inserted, report.updated, report.unchanged, report.deleted) == (1, 0, 2, 3)  # 2 actions, 1 delisting
    assert _actions(clean_db, ["AAA", "BBB"]) == {
        "AAA": {"split": [("2024-01-11", 4.0)], "dividend": [("2024-01-05", 0.25)]},
        "BBB": {"split": [("2024-01-08", 0.1)], "dividend": []},
    }
    assert _delisted(clean_db) == {"AAA": None, "BBB": None}
    assert _versions(clean_db) == {("AAA", "1d"): report.version, ("BBB", "1d"): before[("BBB", "1d")]}
    again = import_actions(clean_db, tmp_path / "b.csv", replace=True)
    assert (again.inserted, again.updated, again.deleted, again.version) == (0, 0, 0, None)


def test_a_parquet_file_with_typed_columns_and_aliases(clean_db: Engine, tmp_path: Path) -> None:
    _load(clean_db, {"AAA": (dt.date(2024, 1, 2), 20)})
    table = pa.table({
        "SYMBOL": ["AAA", "AAA", "AAA"],
        "Ex Date": pa.array([dt.date(2024, 1, 4), dt.date(2024, 1, 9), dt.date(2024, 2, 1)]),
        "Kind": ["dividend", "split", "delist"],
        "amount": pa.array([1 / 3, 1.5, None], pa.float64()),
    })  # fmt: skip
    pq.write_table(table, tmp_path / "actions.parquet")
    report = import_actions(clean_db, tmp_path / "actions.parquet")
    assert _counts(report) == (3, 3, 0, 0, 1)
    assert _actions(clean_db, ["AAA"])["AAA"] == {"split": [("2024-01-09", 1.5)], "dividend": [("2024-01-04", 1 / 3)]}
    assert _delisted(clean_db)["AAA"] == dt.date(2024, 2, 1)


def _problems(engine: Engine, file: Path) -> list[str]:
    with pytest.raises(BarsImportError) as info:
        import_actions(engine, file)
    assert "nothing was imported" in str(info.value)
    return [str(p) for p in info.value.problems]


def test_every_bad_row_is_named_with_its_file_and_line_and_nothing_is_loaded(clean_db: Engine, tmp_path: Path) -> None:
    _load(clean_db, {"AAA": (dt.date(2024, 1, 2), 20)})
    before = _versions(clean_db)
    file = _write(tmp_path / "bad.csv", [
        "symbol,date,action,value",
        "AAA,2024-01-05,dividend,0.25",  # good, yet not loaded
        "AAA,2024-13-01,split,2",
        "AAA,2024-01-06,merger,1",
        "AAA,2024-01-07,split,-2",
        "AAA,2024-01-08,dividend,nan",
        "AAA,2024-01-09,split,",
        "AAA,2024-01-10,delist,3",
        "AAA,2024-01-05,dividend,0.3",
        "bad sym!,2024-01-11,split,2",
        "AAA,2024-01-12,split,4:1",
        "AAA,2024-01-13",
    ])  # fmt: skip
    assert _problems(clean_db, file) == [
        f"{file}, line 3, date: date '2024-13-01' is not a calendar date",
        f"{file}, line 4, action: unknown action 'merger': use split, dividend, delist",
        f"{file}, line 5, value: value must be > 0, got '-2'",
        f"{file}, line 6, value: value must be finite, got 'nan'",
        f"{file}, line 7, value: value is empty: a split needs its ratio, new shares per old share (4 for a 4-for-1 "
        "split, 0.1 for 1-for-10)",
        f"{file}, line 8, value: a delisting takes no value (the date is the last trading day), got '3'",
        f"{file}, line 9, date: duplicate dividend for AAA on 2024-01-05 (first on line 2)",
        f"{file}, line 10, symbol: invalid symbol 'bad sym!' (letters, digits and . - ^ = _, at most 32)",
        f"{file}, line 11, value: value '4:1' is not a number: a split needs its ratio, new shares per old share (4 "
        "for a 4-for-1 split, 0.1 for 1-for-10)",
        f"{file}, line 12: expected 4 columns, got 2",
    ]
    # Known symbols and delistings are checked against the store, in the import's transaction.
    unknown = _write(tmp_path / "unknown.csv", ["symbol,date,action,value", "AAA,2024-01-05,dividend,0.25",
                                                "ZZZ,2024-01-05,split,2", "AAA,2023-12-01,delist,"])  # fmt: skip
    assert _problems(clean_db, unknown) == [
        f"{unknown}, line 3, symbol: unknown symbol ZZZ (import its bars first)",
        f"{unknown}, line 4, date: AAA is delisted on 2023-12-01, before its first trading date 2024-01-02",
    ]
    header = _write(tmp_path / "header.csv", ["symbol,day,action,value,note"])
    assert _problems(clean_db, header) == [
        f"{header}, line 1: columns must be symbol,date,action,value (any order and case): missing column(s) date; "
        "unexpected column(s) 'day', 'note'"
    ]
    repeated = _write(tmp_path / "repeated.csv", ["symbol,date,ex_date,action,value"])
    assert _problems(clean_db, repeated) == [
        f"{repeated}, line 1: columns must be symbol,date,action,value (any order and case): repeated column(s) date"
    ]
    twice = _write(
        tmp_path / "twice.csv", ["symbol,date,action,value", "AAA,2024-01-05,delist,", "AAA,2024-01-06,delist,"]
    )
    assert _problems(clean_db, twice) == [
        f"{twice}, line 3, date: a second delisting date for AAA (first on line 2: 2024-01-05)"
    ]
    parquet = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"symbol": ["AAA", "AAA"], "date": ["2024-01-05", "01/06/2024"],
                             "action": ["split", "split"], "value": [2.0, float("inf")]}), parquet)  # fmt: skip
    assert _problems(clean_db, parquet) == [
        f"{parquet}, row 2, date: date '01/06/2024' is not YYYY-MM-DD",
        f"{parquet}, row 2, value: value must be finite, got inf",
    ]
    assert _actions(clean_db, ["AAA"])["AAA"] == {"split": [], "dividend": []}
    assert _delisted(clean_db) == {"AAA": None}
    assert _versions(clean_db) == before


def test_the_cli_imports_a_file_and_names_bad_lines(settings: Settings, clean_db: Engine, tmp_path: Path) -> None:
    _load(clean_db, {"AAA": (dt.date(2024, 1, 2), 20)})
    env = {**os.environ, "DATABASE_URL": settings.require_database_url(), "ALPHAFORGE_CALLER_CWD": str(tmp_path)}

    def run(name: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "shared.ops.cli", "bars", "actions", "import", name]
        return subprocess.run(command, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=60)

    _write(tmp_path / "good.csv", ["symbol,date,action,value", "AAA,2024-01-10,split,2"])
    done = run("good.csv")
    assert done.returncode == 0, done.stderr
    assert "rows: 1\n" in done.stdout and "inserted: 1\n" in done.stdout and "versioned_symbols: 1\n" in done.stdout
    again = run("good.csv")
    assert again.returncode == 0 and "unchanged: 1\n" in again.stdout and "version: None\n" in again.stdout
    _write(tmp_path / "bad.csv", ["symbol,date,action,value", "AAA,2024-01-11,split,0"])
    bad = run("bad.csv")
    assert bad.returncode == 1
    assert f"{tmp_path / 'bad.csv'}, line 2, value: value must be > 0, got '0'" in bad.stderr
    assert run("missing.csv").returncode == 1


def test_listed_as_of_follows_listing_ranges(clean_db: Engine, tmp_path: Path) -> None:
    """A symbol is listed from its first bar (or an earlier listed_on) to its delisting; a delisted symbol keeps its
    bars and is listed before its delisting date, on it, and not after."""
    _load(clean_db, {"OLD": (dt.date(2020, 1, 2), 900), "STAY": (dt.date(2020, 1, 2), 2000),
                     "NEW": (dt.date(2023, 1, 3), 10)})  # fmt: skip
    with clean_db.begin() as conn:
        conn.execute(text("INSERT INTO symbols (symbol) VALUES ('NOBARS')"))
    import_actions(clean_db, _write(tmp_path / "d.csv", ["symbol,date,action,value", "OLD,2022-06-30,delist,"]))
    with clean_db.connect() as conn:
        assert listed_as_of(conn, dt.date(2020, 1, 1)) == []
        assert listed_as_of(conn, dt.date(2021, 5, 3)) == ["OLD", "STAY"]
        assert listed_as_of(conn, dt.date(2022, 6, 30)) == ["OLD", "STAY"]
        assert listed_as_of(conn, dt.date(2022, 7, 1)) == ["STAY"]
        assert listed_as_of(conn, dt.date(2023, 1, 3)) == ["NEW", "STAY"]
        assert listed_as_of(conn, dt.date(2021, 5, 3), ["STAY", "NEW", "OLD", "STAY", "NOBARS", "NOPE"]) == [
            "STAY",
            "OLD",
        ]
        assert listed_as_of(conn, dt.date(2021, 5, 3), []) == []
        assert listings(conn, ["OLD", "NOBARS"]) == {
            "OLD": Listing(dt.date(2020, 1, 2), dt.date(2022, 6, 30)),
            "NOBARS": Listing(None, None),
        }
        assert (bars := store.read_series(conn, ["OLD"], "1d", cache=store.ChunkCache(0))) and len(bars["OLD"].columns)


def test_listed_on_is_the_earlier_of_the_stored_date_and_the_first_bar_in_the_exchanges_time(
    clean_db: Engine,
) -> None:
    # An hourly series whose first bar is 01:00 UTC on 2024-01-02: 20:00 on 2024-01-01 in New York.
    start = (dt.date(2024, 1, 2) - dt.date(1970, 1, 1)).days * 86_400 + 3600
    hourly = store.columns_of(start + 3600 * np.arange(3), *([np.ones(3)] * 5))
    store.import_columns(clean_db, "1h", {"HRS": hourly})
    _load(clean_db, {"DAY": (dt.date(2024, 1, 5), 3), "EARLY": (dt.date(2024, 1, 5), 3)})
    with clean_db.begin() as conn:
        conn.execute(text("UPDATE symbols SET listed_on = DATE '2023-06-01' WHERE symbol = 'EARLY'"))
        conn.execute(text("INSERT INTO symbols (symbol) VALUES ('NOBARS')"))
        assert [s for s in ("HRS", "DAY") if s in listed_as_of(conn, dt.date(2024, 1, 1))] == ["HRS"]
        assert refresh_listed_on(conn, None) == 0  # the imports kept it current
        conn.execute(text("UPDATE symbols SET listed_on = NULL WHERE symbol IN ('HRS', 'DAY')"))
        assert refresh_listed_on(conn, ["HRS", "DAY", "EARLY", "NOBARS"]) == 2
        stored = {symbol: day for symbol, day in conn.execute(text("SELECT symbol, listed_on FROM symbols"))}
    assert stored == {"HRS": dt.date(2024, 1, 1), "DAY": dt.date(2024, 1, 5), "EARLY": dt.date(2023, 6, 1),
                      "NOBARS": None}  # fmt: skip


def test_a_universe_as_of_a_date_and_its_timeframe(client: FlaskClient, engine: Engine, tmp_path: Path) -> None:
    _load(engine, {"UOLD": (dt.date(2020, 1, 2), 900), "USTAY": (dt.date(2020, 1, 2), 2000),
                   "UNEW": (dt.date(2023, 1, 3), 10)})  # fmt: skip
    import_actions(engine, _write(tmp_path / "d.csv", ["symbol,date,action,value", "UOLD,2022-06-30,delist,"]))
    response = client.post(UNIVERSES, json={"name": "all", "symbols": ["UNEW", "UOLD", "USTAY"]})
    assert response.status_code == 201, response.get_json()
    created = response.get_json()
    assert created["timeframe"] == "1d" and created["as_of"] is None
    url = created["url"]
    assert client.get(url).get_json() == created

    def as_of(day: str) -> list[str]:
        body = client.get(f"{url}?as_of={day}").get_json()
        assert body["as_of"] == day
        return list(body["symbols"])

    assert as_of("2021-05-03") == ["UOLD", "USTAY"]
    assert as_of("2022-06-30") == ["UOLD", "USTAY"]
    assert as_of("2022-07-01") == ["USTAY"]
    assert as_of("2023-01-03") == ["UNEW", "USTAY"]
    for bad in ("2022-02-30", "yesterday", "2022-1-5"):
        response = client.get(f"{url}?as_of={bad}")
        assert response.status_code == 422
        error = response.get_json()["error"]
        assert error["code"] == "validation_error" and [e["field"] for e in error["details"]["errors"]] == ["as_of"]

    weekly = client.post(UNIVERSES, json={"name": "weekly", "symbols": ["USTAY"], "timeframe": "1w"}).get_json()
    assert weekly["timeframe"] == "1w"
    updated = client.put(url, json={"timeframe": "1h"}).get_json()
    assert updated["timeframe"] == "1h" and updated["version"] == 2
    assert client.put(url, json={"timeframe": "1h"}).get_json()["version"] == 2
    listed = client.get(UNIVERSES).get_json()["universes"]
    assert {u["name"]: u["timeframe"] for u in listed} == {"all": "1h", "weekly": "1w"}
    for body in ({"name": "x", "symbols": ["USTAY"], "timeframe": "2d"}, {"name": "x", "symbols": ["USTAY"],
                                                                         "timeframe": None}):  # fmt: skip
        response = client.post(UNIVERSES, json=body)
        assert response.status_code == 422
        assert [e["field"] for e in response.get_json()["error"]["details"]["errors"]] == ["timeframe"]


def test_universe_functions_for_runs(client: FlaskClient, engine: Engine, session_factory: Any) -> None:
    """What the run and calculation paths call: find_for_run (the universe, its timeframe) and resolve_as_of."""
    _load(engine, {"RA": (dt.date(2020, 1, 2), 10), "RB": (dt.date(2021, 1, 4), 10)})
    universe_id = client.post(UNIVERSES, json={"name": "r", "symbols": ["RB", "RA"], "timeframe": "1w"}).get_json()[
        "universe_id"
    ]
    owner = client.get(f"{UNIVERSES}/{universe_id}").get_json()["owner_id"]
    with session_factory() as session:
        universe = universes.find_for_run(session, owner, "r")
        assert str(universe.id) == universe_id and universe.timeframe == "1w"
        assert universes.find_for_run(session, owner, universe_id).symbols == ["RB", "RA"]
        assert universes.resolve_as_of(session, universe.symbols, dt.date(2020, 6, 1)) == ["RA"]
        assert universes.resolve_as_of(session, universe.symbols, dt.date(2021, 6, 1)) == ["RB", "RA"]
    assert typing.get_args(Timeframe) == universes.TIMEFRAMES
