"""The synthetic demo universe: determinism, realism invariants, and loading through the importer's path."""

from __future__ import annotations

import datetime as dt
from typing import Any

import numpy as np
import pytest
from sqlalchemy import Engine, text

from shared.domain.stats import TRADING_DAYS
from shared.marketdata.demo import (
    DEFAULT_END_DATE,
    DemoConflict,
    DemoSeries,
    business_days,
    generate_demo_bars,
    load_demo_universe,
)
from tests.helpers import copy_bars, stored_rows


def _universe(symbols: int = 4, years: int = 2, seed: int = 7, end: dt.date | None = None) -> list[DemoSeries]:
    return list(generate_demo_bars(symbols, years, seed, end))


def _same(a: DemoSeries, b: DemoSeries) -> bool:
    return a.symbol == b.symbol and all(
        np.array_equal(getattr(a, column), getattr(b, column))
        for column in ("dates", "open", "high", "low", "close", "volume")
    )


def _bars(engine: Engine) -> list[tuple[Any, ...]]:
    return stored_rows(engine)


# -- the pure generator -----------------------------------------------------------------------------


def test_same_seed_gives_identical_data() -> None:
    first, second = _universe(seed=11), _universe(seed=11)
    assert all(_same(a, b) for a, b in zip(first, second, strict=True))


def test_different_seed_gives_different_data() -> None:
    for a, b in zip(_universe(seed=11), _universe(seed=12), strict=True):
        assert a.symbol == b.symbol
        assert not np.array_equal(a.close, b.close)
        assert not np.array_equal(a.volume, b.volume)


def test_a_symbol_does_not_depend_on_universe_size() -> None:
    small, large = _universe(symbols=2), _universe(symbols=5)
    assert all(_same(a, b) for a, b in zip(small, large[:2], strict=True))


def test_names_and_shapes() -> None:
    universe = _universe(symbols=3, years=2, seed=5)
    assert [s.symbol for s in universe] == ["SYN0001", "SYN0002", "SYN0003"]
    assert universe[1].name == "Synthetic 0002 (seed 5)"
    for series in universe:
        assert len(series.dates) == 2 * TRADING_DAYS
        for column in (series.open, series.high, series.low, series.close):
            assert column.dtype == np.float64 and column.shape == series.dates.shape
        assert series.volume.dtype == np.int64


def test_business_days_end_at_the_fixed_default_date() -> None:
    dates = _universe(symbols=1, years=3)[0].dates
    assert dates[-1] == np.datetime64(DEFAULT_END_DATE) == np.datetime64("2025-12-31")
    assert np.all(np.is_busday(dates))
    assert np.all(np.diff(dates).astype(int) > 0)
    # Mon-Fri without gaps: every skipped calendar day is a weekend day.
    all_days = np.arange(dates[0], dates[-1] + 1)
    assert np.array_equal(all_days[np.is_busday(all_days)], dates)


def test_end_date_on_a_weekend_rolls_back_to_friday() -> None:
    dates = business_days(5, dt.date(2024, 6, 9))  # a Sunday
    assert [str(d) for d in dates] == ["2024-06-03", "2024-06-04", "2024-06-05", "2024-06-06", "2024-06-07"]


def test_ohlc_invariants_and_positive_volumes() -> None:
    for series in _universe(symbols=20, years=3, seed=3):
        assert np.all(series.low > 0)
        assert np.all(series.high >= np.maximum(series.open, series.close))
        assert np.all(series.low <= np.minimum(series.open, series.close))
        assert np.all(series.high >= series.low)
        assert np.all(series.volume > 0)
        assert np.all(np.round(series.close, 4) == series.close)  # quoted to the tick


def test_volumes_stay_whole_and_bounded_in_a_large_universe() -> None:
    """Seed 3 drew shocks extreme enough (SYN0891 among the first 891 symbols over 10 years) to overflow volume."""
    for series in generate_demo_bars(891, 10, seed=3):
        assert series.volume.min() >= 1 and series.volume.max() <= 2**53, series.symbol


def test_statistics_are_plausible() -> None:
    vols, correlations = [], []
    for series in _universe(symbols=30, years=4, seed=9):
        returns = np.diff(np.log(series.close))
        vols.append(returns.std() * np.sqrt(TRADING_DAYS))
        correlations.append(np.corrcoef(np.abs(returns), np.log(series.volume[1:]))[0, 1])
        gaps = series.open[1:] / series.close[:-1]
        assert np.any(gaps != 1.0)  # opens are gapped from the previous close
    assert min(vols) > 0.12 and max(vols) < 0.70  # drawn from 15-60 % annualised
    assert np.mean(correlations) > 0.1  # volume rises with the size of the move


@pytest.mark.parametrize(("symbols", "years", "seed"), [(0, 1, 1), (1, 0, 1), (1, 1, -1)])
def test_rejects_nonsense_arguments(symbols: int, years: int, seed: int) -> None:
    with pytest.raises(ValueError):
        next(generate_demo_bars(symbols, years, seed))


# -- loading --------------------------------------------------------------------------------------


def test_load_stores_exactly_the_generated_bars(clean_db: Engine) -> None:
    report = load_demo_universe(clean_db, symbols=3, years=1, seed=21)
    rows = 3 * TRADING_DAYS
    assert (report.symbols, report.rows, report.inserted, report.updated) == (3, rows, rows, 0)
    assert report.end_date == DEFAULT_END_DATE
    expected = [
        (s.symbol, d.astype(dt.date), o, h, lo, c, v)
        for s in _universe(symbols=3, years=1, seed=21)
        for d, o, h, lo, c, v in zip(
            s.dates, s.open.tolist(), s.high.tolist(), s.low.tolist(), s.close.tolist(), s.volume.tolist(), strict=True
        )
    ]
    assert _bars(clean_db) == expected
    with clean_db.connect() as conn:
        symbols = conn.execute(text("SELECT symbol, name, is_synthetic FROM symbols ORDER BY 1")).all()
    assert [tuple(r) for r in symbols] == [(f"SYN000{i}", f"Synthetic 000{i} (seed 21)", True) for i in (1, 2, 3)]


def test_reload_is_idempotent_and_another_seed_updates(clean_db: Engine) -> None:
    load_demo_universe(clean_db, symbols=2, years=1, seed=1)
    first = _bars(clean_db)
    again = load_demo_universe(clean_db, symbols=2, years=1, seed=1)
    assert (again.inserted, again.updated) == (0, 0)
    assert _bars(clean_db) == first

    for changed in ({"seed": 2}, {"years": 2}, {"end_date": dt.date(2025, 6, 30)}):  # never silently over them
        with pytest.raises(DemoConflict, match="differ from this universe"):
            load_demo_universe(clean_db, symbols=2, **({"years": 1, "seed": 1} | changed))
        assert _bars(clean_db) == first

    other = load_demo_universe(clean_db, symbols=2, years=1, seed=2, replace=True)
    assert (other.inserted, other.updated) == (2 * TRADING_DAYS, 0)
    assert _bars(clean_db) != first
    with clean_db.connect() as conn:
        names = conn.execute(text("SELECT name FROM symbols ORDER BY symbol")).scalars().all()
    assert names == ["Synthetic 0001 (seed 2)", "Synthetic 0002 (seed 2)"]


def test_the_demo_refuses_symbols_with_real_bars(clean_db: Engine) -> None:
    seed_real = [{"symbol": "SYN0001", "date": dt.date(2025, 12, 30), "open": 10.0, "high": 11.0, "low": 9.0,
                  "close": 10.5, "volume": 100}]  # fmt: skip
    with clean_db.begin() as conn:
        copy_bars(conn, seed_real)
    with pytest.raises(DemoConflict, match="SYN0001 hold real bars"):
        load_demo_universe(clean_db, symbols=2, years=1, seed=1)
    assert [r[0] for r in _bars(clean_db)] == ["SYN0001"]
    load_demo_universe(clean_db, symbols=2, years=1, seed=1, replace=True)
    assert len(_bars(clean_db)) == 2 * TRADING_DAYS


def test_loaded_rows_satisfy_invariants_in_sql(clean_db: Engine) -> None:
    load_demo_universe(clean_db, symbols=10, years=2, seed=4, end_date=dt.date(2024, 6, 30))
    rows = _bars(clean_db)
    stats = (
        len(rows),
        sum(1 for _, _, o, h, lo, c, v in rows if h < max(o, c, lo) or lo > min(o, c) or lo <= 0 or v <= 0),
        sum(1 for _, day, *_ in rows if day.isoweekday() in (6, 7)),
        max(day for _, day, *_ in rows),
        len({symbol for symbol, *_ in rows}),
    )
    with clean_db.connect() as conn:
        not_synthetic = conn.execute(text("SELECT count(*) FROM symbols WHERE NOT is_synthetic")).scalar_one()
    assert tuple(stats) == (10 * 2 * TRADING_DAYS, 0, 0, dt.date(2024, 6, 28), 10)
    assert not_synthetic == 0
