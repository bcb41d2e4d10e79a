"""A seeded synthetic universe of daily bars, so the product can be demoed and benchmarked without data.

Why it looks the way it does:

* Deterministic: the calendar ends at a fixed date by default (not "today") and every symbol draws
  from its own child of ``SeedSequence(seed)``, so one seed is one data set, forever, and symbol
  ``SYN0007`` is the same series whether the universe has 10 or 500 symbols.
* Plausible enough for alpha scripts: per-symbol drift and annual volatility (15-60 %), fat-tailed
  daily returns, an overnight gap between the previous close and the open, highs/lows enclosing
  the body, and lognormal volumes that rise with the size of the move.
* Loaded through :func:`shared.marketdata.store.import_columns`, the importer's path, so it is idempotent by
  ``(symbol, date)`` and all-or-nothing.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from sqlalchemy import Engine, text

from shared.domain.stats import TRADING_DAYS
from shared.marketdata import store
from shared.marketdata.series import DEFAULT_TIMEFRAME, SECONDS_PER_DAY, Columns
from shared.marketdata.store import SymbolInfo

DEFAULT_END_DATE = dt.date(2025, 12, 31)

SYMBOL_PREFIX = "SYN"

# Per-symbol parameter ranges (annualised).
_VOL_RANGE = (0.15, 0.60)
_DRIFT_RANGE = (-0.05, 0.20)
_START_PRICE_RANGE = (5.0, 500.0)
_MEAN_VOLUME_RANGE = (50_000.0, 20_000_000.0)
# Share of a day's return variance that happens overnight (between previous close and open).
_OVERNIGHT_VARIANCE_SHARE = 0.2
# Student-t degrees of freedom of daily shocks: fat tails like real returns, finite variance.
_SHOCK_DOF = 4.0
# Prices are quoted to 4 decimals; nothing goes below one tick.
_PRICE_DECIMALS = 4
_MIN_PRICE = 10.0**-_PRICE_DECIMALS
# log(volume) = log(mean) + _VOLUME_MOVE_BETA * (|z| - E|z|) + N(0, _VOLUME_NOISE): busier on big moves.
_VOLUME_MOVE_BETA = 0.35
_VOLUME_NOISE = 0.30
# A day's volume is at most this multiple of the symbol's mean: the fat-tailed shocks' rare extremes (|t| of 50 and
# more among millions of draws) would otherwise make volumes beyond 2**53, even past int64.
_MAX_VOLUME_MULTIPLE = 50.0

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
DateArray = npt.NDArray[np.datetime64]


@dataclass(frozen=True)
class DemoSeries:
    """One symbol's bars as column arrays (all of length ``len(dates)``)."""

    symbol: str
    name: str
    dates: DateArray
    open: FloatArray
    high: FloatArray
    low: FloatArray
    close: FloatArray
    volume: IntArray


@dataclass(frozen=True)
class DemoReport:
    symbols: int
    rows: int
    inserted: int
    updated: int
    start_date: dt.date
    end_date: dt.date
    generate_seconds: float
    load_seconds: float

    @property
    def seconds(self) -> float:
        return self.generate_seconds + self.load_seconds


def symbol_name(index: int) -> str:
    """``SYN0001`` ... (1-based, zero-padded to 4; wider universes simply get longer names)."""
    return f"{SYMBOL_PREFIX}{index:04d}"


def business_days(sessions: int, end: dt.date) -> DateArray:
    """The last ``sessions`` Monday-to-Friday dates on or before ``end`` (no holiday calendar)."""
    if sessions < 1:
        raise ValueError("sessions must be >= 1")
    last = np.busday_offset(np.datetime64(end, "D"), 0, roll="backward")
    return np.busday_offset(last, np.arange(-(sessions - 1), 1))


def generate_series(rng: np.random.Generator, dates: DateArray, symbol: str, name: str) -> DemoSeries:
    """One symbol's random walk: closes from fat-tailed log returns, opens gapped, wicks around the body."""
    n = len(dates)
    annual_vol = rng.uniform(*_VOL_RANGE)
    annual_drift = rng.uniform(*_DRIFT_RANGE)
    start_price = float(np.exp(rng.uniform(*np.log(_START_PRICE_RANGE))))
    mean_volume = float(np.exp(rng.uniform(*np.log(_MEAN_VOLUME_RANGE))))

    daily_vol = annual_vol / np.sqrt(TRADING_DAYS)
    daily_drift = (annual_drift - 0.5 * annual_vol**2) / TRADING_DAYS
    # Unit-variance Student-t shocks, split into an overnight and an intraday part.
    shocks = rng.standard_t(_SHOCK_DOF, size=(2, n)) / np.sqrt(_SHOCK_DOF / (_SHOCK_DOF - 2.0))
    overnight = daily_drift * _OVERNIGHT_VARIANCE_SHARE + daily_vol * np.sqrt(_OVERNIGHT_VARIANCE_SHARE) * shocks[0]
    intraday = (
        daily_drift * (1 - _OVERNIGHT_VARIANCE_SHARE) + daily_vol * np.sqrt(1 - _OVERNIGHT_VARIANCE_SHARE) * shocks[1]
    )

    log_close = np.log(start_price) + np.cumsum(overnight + intraday)
    log_open = log_close - intraday
    # Wicks: half-normal excursions beyond the body, scaled to the intraday volatility.
    wick_scale = 0.5 * daily_vol
    log_high = np.maximum(log_open, log_close) + np.abs(rng.normal(0.0, wick_scale, n))
    log_low = np.minimum(log_open, log_close) - np.abs(rng.normal(0.0, wick_scale, n))
    open_, high, low, close = _quote(np.exp(log_open), np.exp(log_high), np.exp(log_low), np.exp(log_close))

    move = np.abs((overnight + intraday - daily_drift) / daily_vol)
    expected_move = np.mean(np.abs(shocks[0] + shocks[1])) / np.sqrt(2.0)
    log_volume = (
        np.log(mean_volume)
        + _VOLUME_MOVE_BETA * (move - expected_move)
        + rng.normal(-0.5 * _VOLUME_NOISE**2, _VOLUME_NOISE, n)
    )
    log_volume = np.minimum(log_volume, np.log(mean_volume * _MAX_VOLUME_MULTIPLE))
    volume = np.maximum(1, np.rint(np.exp(log_volume))).astype(np.int64)
    return DemoSeries(symbol, name, dates, open_, high, low, close, volume)


def _quote(
    open_: FloatArray, high: FloatArray, low: FloatArray, close: FloatArray
) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray]:
    """Round to the tick and re-impose the OHLC envelope, which rounding alone could break."""
    open_q = np.maximum(np.round(open_, _PRICE_DECIMALS), _MIN_PRICE)
    close_q = np.maximum(np.round(close, _PRICE_DECIMALS), _MIN_PRICE)
    high_q = np.maximum(np.round(high, _PRICE_DECIMALS), np.maximum(open_q, close_q))
    low_q = np.maximum(np.minimum(np.round(low, _PRICE_DECIMALS), np.minimum(open_q, close_q)), _MIN_PRICE)
    return open_q, high_q, low_q, close_q


def generate_demo_bars(symbols: int, years: int, seed: int, end: dt.date | None = None) -> Iterator[DemoSeries]:
    """Yield ``symbols`` series of ``252 * years`` business days ending on or before ``end``.

    Pure: nothing but ``(symbols, years, seed, end)`` determines the output.
    """
    if symbols < 1:
        raise ValueError("symbols must be >= 1")
    if years < 1:
        raise ValueError("years must be >= 1")
    if seed < 0:
        raise ValueError("seed must be >= 0")
    dates = business_days(TRADING_DAYS * years, end or DEFAULT_END_DATE)
    children = np.random.SeedSequence(seed).spawn(symbols)
    for index, child in enumerate(children, start=1):
        yield generate_series(
            np.random.default_rng(child), dates, symbol_name(index), f"Synthetic {index:04d} (seed {seed})"
        )


def _listed(symbols: list[str]) -> str:
    return ", ".join(symbols[:5]) + (f" and {len(symbols) - 5} more" if len(symbols) > 5 else "")


def series_columns(series: DemoSeries) -> Columns:
    return store.columns_of(
        series.dates.astype(np.int64) * SECONDS_PER_DAY, series.open, series.high, series.low, series.close,
        series.volume,
    )  # fmt: skip


class DemoConflict(ValueError):
    """The demo universe would change bars already stored (real ones, or another seed's, length's or end's)."""


def load_demo_universe(
    engine: Engine, *, symbols: int, years: int, seed: int, end_date: dt.date | None = None, replace: bool = False
) -> DemoReport:
    """Generate the universe and upsert it in one transaction; symbols are marked ``is_synthetic``.

    Loading the same universe again changes nothing. One that would change stored bars (the symbols hold real bars,
    or another seed's, length's or end date's) raises :class:`DemoConflict` and loads nothing, unless ``replace``:
    then those symbols' daily series are replaced by the generated ones."""
    started = time.perf_counter()
    infos: list[SymbolInfo] = []
    incoming: dict[str, Columns] = {}
    rows = 0
    dates: DateArray | None = None
    for series in generate_demo_bars(symbols, years, seed, end_date):
        dates = series.dates
        incoming[series.symbol] = series_columns(series)
        infos.append(SymbolInfo(series.symbol, series.name, is_synthetic=True))
        rows += len(series.dates)
    generated = time.perf_counter()
    with engine.begin() as conn:
        names = list(incoming)
        if replace:
            conn.execute(text("DELETE FROM bar_series WHERE timeframe = :tf AND symbol = ANY(:s)"),
                         {"tf": DEFAULT_TIMEFRAME, "s": names})  # fmt: skip
        else:
            real = conn.scalars(
                text("SELECT s.symbol FROM symbols s JOIN bar_series b ON b.symbol = s.symbol"
                     " WHERE s.symbol = ANY(:s) AND NOT s.is_synthetic ORDER BY 1"), {"s": names}
            ).all()  # fmt: skip
            if real:
                raise DemoConflict(
                    f"{_listed(list(real))} hold real bars; nothing was loaded (--replace replaces them)"
                )
        counts = store.store_columns(conn, DEFAULT_TIMEFRAME, incoming, symbols=infos)
        if counts.updated and not replace:
            raise DemoConflict(
                f"{counts.updated:,} stored bars of {_listed(names)} differ from this universe's (another seed, "
                "length or end date); nothing was loaded (--replace replaces their series)"
            )  # the transaction rolls back
    assert dates is not None
    return DemoReport(
        symbols=len(infos),
        rows=rows,
        inserted=counts.inserted,
        updated=counts.updated,
        start_date=dates[0].astype(dt.date),
        end_date=dates[-1].astype(dt.date),
        generate_seconds=generated - started,
        load_seconds=time.perf_counter() - generated,
    )
