"""Data previews: ``GET /api/candles`` (a symbol's bars at a timeframe, adjusted) and ``GET /api/features`` (an
indicator over them).

Both read through ``load_bars`` (``timeframe``, ``adjustment``: a calculation's defaults), are paged by bar (``cursor``
is the last bar's ``ts`` of the previous page) and validated: an unknown symbol, an inverted date range, an unknown
timeframe or indicator, or a parameter it does not take is a 422 naming the field. Indicators are computed over the
symbol's whole history and then cut to the range, so a page's first values are as warm as in a backtest (the same
NumPy core as the scripts' ``ta`` module).
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
from flask import Response, jsonify
from flask_openapi3 import APIBlueprint, Tag
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from sqlalchemy import select

from api import BEARER_SECURITY, services
from api.schemas import Adjustment, ErrorResponse, Timeframe
from shared.domain.indicators import core as indicators
from shared.errors import ValidationFailed
from shared.infra import pagination
from shared.infra.models import Symbol
from shared.jobs.calculations.submit import CALCULATION_ADJUSTMENT
from shared.marketdata.bars import SYMBOL_PATTERN, SymbolBars, load_bars

bp = APIBlueprint("previews", __name__, url_prefix="/api", abp_tags=[Tag(name="data")], abp_security=BEARER_SECURITY)

Indicator = Literal[
    "sma", "ema", "wma", "rsi", "stdev", "zscore", "atr", "bollinger", "macd", "drawdown", "pct_change", "log_returns"
]
# Which query parameters each indicator takes (anything else given is a 422 naming it).
PARAMETERS: dict[str, frozenset[str]] = {
    "sma": frozenset({"period"}),
    "ema": frozenset({"period"}),
    "wma": frozenset({"period"}),
    "rsi": frozenset({"period"}),
    "stdev": frozenset({"period"}),
    "zscore": frozenset({"period"}),
    "atr": frozenset({"period"}),
    "bollinger": frozenset({"period", "k"}),
    "macd": frozenset({"fast", "slow", "signal"}),
    "drawdown": frozenset(),
    "pct_change": frozenset({"periods"}),
    "log_returns": frozenset({"periods"}),
}


class _RangeQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    symbol: str = Field(max_length=32)
    start: dt.date | None = None
    end: dt.date | None = None
    timeframe: Timeframe = Field(default="1d", description="stored bars, or coarser ones resampled (1w, 1mo)")
    adjustment: Adjustment = Field(default=CALCULATION_ADJUSTMENT, description="none, splits or total_return")
    limit: int = Field(default=500, ge=1, le=5000)
    cursor: str | None = Field(default=None, max_length=100, description="next_cursor of the previous page")

    @field_validator("symbol")
    @classmethod
    def _symbol(cls, value: str) -> str:
        symbol = value.strip().upper()
        if not SYMBOL_PATTERN.fullmatch(symbol):
            raise ValueError(f"invalid symbol {value[:40]!r}")
        return symbol

    @model_validator(mode="after")
    def _range(self) -> _RangeQuery:
        if self.start and self.end and self.start > self.end:
            raise ValidationFailed.for_field("end", f"the date range is empty: end {self.end} is before {self.start}")
        return self


class CandlesQuery(_RangeQuery):
    pass


class FeaturesQuery(_RangeQuery):
    indicator: Indicator
    period: int | None = Field(default=None, ge=1, le=5000)
    periods: int | None = Field(default=None, ge=1, le=5000)
    k: float | None = Field(default=None, gt=0, le=10)
    fast: int | None = Field(default=None, ge=1, le=5000)
    slow: int | None = Field(default=None, ge=2, le=5000)
    signal: int | None = Field(default=None, ge=1, le=5000)

    @model_validator(mode="after")
    def _parameters(self) -> FeaturesQuery:
        allowed = PARAMETERS[self.indicator]
        for name in ("period", "periods", "k", "fast", "slow", "signal"):
            if getattr(self, name) is not None and name not in allowed:
                takes = ", ".join(sorted(allowed)) or "no parameters"
                raise ValidationFailed.for_field(name, f"{self.indicator} takes {takes}")
        if self.fast is not None and self.slow is not None and self.fast >= self.slow:
            raise ValidationFailed.for_field("fast", f"fast ({self.fast}) must be less than slow ({self.slow})")
        return self


class Candle(BaseModel):
    date: str = Field(description="ISO date, or for intraday bars an ISO UTC timestamp")
    open: float
    high: float
    low: float
    close: float
    volume: float


class CandlesPage(BaseModel):
    symbol: str
    candles: list[Candle]
    next_cursor: str | None


class FeaturesPage(BaseModel):
    symbol: str
    indicator: str
    params: dict[str, Any]
    columns: list[str]
    rows: list[dict[str, Any]] = Field(description="date and one value per column (null during warm-up)")
    next_cursor: str | None


def _bars(query: _RangeQuery, *, whole_history: bool = False) -> tuple[SymbolBars | None, int]:
    """The symbol's bars up to ``query.end`` (from its first bar with ``whole_history``, else from ``query.start``)
    and the index of the first bar on or after ``query.start``."""
    with services().session_factory() as session:
        if session.scalar(select(Symbol.symbol).where(Symbol.symbol == query.symbol)) is None:
            raise ValidationFailed.for_field("symbol", f"unknown symbol {query.symbol}")
        conn = session.connection()
        read = {"timeframe": query.timeframe, "adjustment": query.adjustment}
        bars = load_bars(conn, [query.symbol], None if whole_history else query.start, query.end, **read)
        found = bars.get(query.symbol)
        if found is None or not whole_history or query.start is None:
            return found, 0
        # The bounds are local dates: the first bar in range is the first bar a read from ``start`` returns.
        in_range = load_bars(conn, [query.symbol], query.start, query.end, **read).get(query.symbol)
        first = len(found) if in_range is None else int(np.searchsorted(found.ts, in_range.ts[0]))
        return found, first


def _window(bars: SymbolBars | None, first: int, query: _RangeQuery) -> tuple[int, int, str | None]:
    """[lo, hi) of the page within ``bars`` (from index ``first``) and the next cursor (the page's last ``ts``)."""
    if bars is None:
        return 0, 0, None
    (after,) = pagination.decode_cursor(query.cursor, (pagination.integer,)) if query.cursor else (None,)
    lo = max(first, int(np.searchsorted(bars.ts, after, side="right")) if after is not None else 0)
    hi = min(len(bars), lo + query.limit)
    return lo, hi, pagination.encode_cursor([int(bars.ts[hi - 1])]) if hi < len(bars) and hi > lo else None


@bp.get("/candles", responses={200: CandlesPage, 401: ErrorResponse, 422: ErrorResponse})
def candles(query: CandlesQuery) -> Response:
    """A symbol's bars at ``timeframe`` on the local dates [start, end], oldest first, paged."""
    bars, first = _bars(query)
    dates = bars.dates if bars else ()
    lo, hi, cursor = _window(bars, first, query)
    page = CandlesPage(
        symbol=query.symbol,
        candles=[
            Candle(
                date=dates[i],
                open=bars.open[i],
                high=bars.high[i],
                low=bars.low[i],
                close=bars.close[i],
                volume=bars.volume[i],
            )
            for i in range(lo, hi)
            if bars is not None
        ],
        next_cursor=cursor,
    )
    return jsonify(page.model_dump(mode="json"))


def _compute(query: FeaturesQuery, bars: SymbolBars) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    close = np.asarray(bars.close, dtype=np.float64)
    name = query.indicator
    period = query.period or (14 if name in ("rsi", "atr") else 20)
    one: dict[str, Callable[[], np.ndarray]] = {
        "sma": lambda: indicators.sma(close, period),
        "ema": lambda: indicators.ema(close, period),
        "wma": lambda: indicators.wma(close, period),
        "rsi": lambda: indicators.rsi(close, period),
        "stdev": lambda: indicators.stdev(close, period),
        "zscore": lambda: indicators.zscore(close, period),
        "atr": lambda: indicators.atr(bars.high, bars.low, close, period),
    }
    if name in one:
        return {"period": period}, {name: one[name]()}
    if name == "bollinger":
        k = query.k if query.k is not None else 2.0
        upper, middle, lower = indicators.bollinger(close, period, k)
        return {"period": period, "k": k}, {"upper": upper, "middle": middle, "lower": lower}
    if name == "macd":
        fast, slow, signal = query.fast or 12, query.slow or 26, query.signal or 9
        if fast >= slow:
            raise ValidationFailed.for_field("fast", f"fast ({fast}) must be less than slow ({slow})")
        line, sig, hist = indicators.macd(close, fast, slow, signal)
        return {"fast": fast, "slow": slow, "signal": signal}, {"macd": line, "signal": sig, "histogram": hist}
    if name == "drawdown":
        return {}, {"drawdown": indicators.drawdown(close)}
    periods = query.periods or 1
    fn = indicators.pct_change if name == "pct_change" else indicators.log_returns
    return {"periods": periods}, {name: fn(close, periods)}


def _json_number(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


@bp.get("/features", responses={200: FeaturesPage, 401: ErrorResponse, 422: ErrorResponse})
def features(query: FeaturesQuery) -> Response:
    """An indicator over a symbol's bars (computed on its whole history, then cut to [start, end]), paged."""
    bars, first = _bars(query, whole_history=True)
    dates = bars.dates if bars else ()
    lo, hi, cursor = _window(bars, first, query)
    params, columns = _compute(query, bars) if bars is not None else ({}, {})
    rows = [
        {"date": dates[i], **{col: _json_number(values[i]) for col, values in columns.items()}} for i in range(lo, hi)
    ]
    page = FeaturesPage(
        symbol=query.symbol,
        indicator=query.indicator,
        params=params,
        columns=list(columns),
        rows=rows,
        next_cursor=cursor,
    )
    return jsonify(page.model_dump(mode="json"))
