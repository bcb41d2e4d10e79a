"""The run as a portfolio of equal-cash sleeves: curves, returns, Sharpe, and each symbol's baseline backtest."""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

from shared.domain.backtest import BacktestConfig, BacktestResult, Bars, BarsError, run_backtest
from shared.domain.stats import sharpe_ratio

_EPOCH_ORDINAL = dt.date(1970, 1, 1).toordinal()


def as_days(dates: Sequence[dt.date] | NDArray[np.datetime64]) -> NDArray[np.datetime64]:
    """``datetime64[D]`` of a list of dates (intraday instants: their UTC day, repeated per bar); through ordinals,
    which is several times faster than numpy's own conversion of date objects (it matters for hundreds of curves of
    thousands of bars)."""
    if isinstance(dates, np.ndarray):
        return dates.astype("datetime64[D]")
    ordinals = np.fromiter((d.toordinal() for d in dates), dtype=np.int64, count=len(dates))
    return (ordinals - _EPOCH_ORDINAL).astype("datetime64[D]")


Curves = Sequence[tuple[Sequence[dt.date] | NDArray[np.datetime64], Sequence[float] | NDArray[np.float64]]]


def portfolio_curve(curves: Curves, initial_cash: float) -> tuple[NDArray[np.datetime64], NDArray[np.float64]]:
    """(dates, equity) of equal-cash sleeves summed on the union of their dates: a sleeve holds its cash before
    its first bar and its last equity after its last bar. The portfolio is daily whatever the bars: an intraday
    curve counts with its last value of each UTC day (so its returns, Sharpe and bootstrap are daily, annualised
    by 252 as for daily bars)."""
    days = [as_days(d) for d, _ in curves]
    all_dates = np.unique(np.concatenate(days))
    total = np.zeros(len(all_dates))
    for own, (_, equity) in zip(days, curves, strict=True):
        positions = np.searchsorted(own, all_dates, side="right") - 1
        values = np.asarray(equity, dtype=np.float64)
        total += np.where(positions >= 0, values[np.clip(positions, 0, None)], initial_cash)
    return all_dates, total


class PortfolioSum:
    """:func:`portfolio_curve` fed a batch of curves at a time (a run's finalization and artifacts read its curves
    in batches, never all at once): the same dates and, sleeves added in the same order, the same sums bit for bit.
    A date that a batch adds to the union gets what the sleeves so far held there: their value at the union's date
    before it (none of their own dates lies in between), or their cash if it precedes every date so far."""

    def __init__(self, initial_cash: float) -> None:
        self.initial_cash = initial_cash
        self.dates: NDArray[np.datetime64] = np.empty(0, dtype="datetime64[D]")
        self.total: NDArray[np.float64] = np.zeros(0)
        self.sleeves = 0
        self._before = 0.0  # the sum so far at a date before every sleeve's first bar: their cash, added one by one

    def add(self, curves: Curves) -> None:
        days = [as_days(d) for d, _ in curves]
        if not days:
            return
        union = np.unique(np.concatenate([self.dates, *days]))
        if len(union) != len(self.dates):
            at = np.searchsorted(self.dates, union, side="right") - 1
            held = self.total[np.clip(at, 0, None)] if len(self.total) else np.zeros(len(union))
            self.dates, self.total = union, np.where(at >= 0, held, self._before)
        for own, (_, equity) in zip(days, curves, strict=True):
            positions = np.searchsorted(own, self.dates, side="right") - 1
            values = np.asarray(equity, dtype=np.float64)
            self.total += np.where(positions >= 0, values[np.clip(positions, 0, None)], self.initial_cash)
            self._before += self.initial_cash
            self.sleeves += 1


def portfolio_returns(total: NDArray[np.float64], start_equity: float) -> NDArray[np.float64]:
    """Daily returns of a portfolio's equity, the first one from the starting cash."""
    series = np.concatenate([[start_equity], total])
    return np.asarray(series[1:] / series[:-1] - 1, dtype=np.float64)


def portfolio_sharpe(total: NDArray[np.float64], start_equity: float, risk_free_rate: float = 0.0) -> float:
    """Annualised Sharpe of the portfolio's daily returns (:func:`shared.domain.stats.sharpe_ratio`, 252
    periods); NaN without variance."""
    return sharpe_ratio(portfolio_returns(total, start_equity), risk_free_rate)


class Backtester(Protocol):
    """Backtests several symbols' bars at once: one result per bars, None where the strategy failed on them. A
    script strategy (``shared.library.strategy_scripts.ScriptBacktester``) runs its sandbox once per call; ``keep``
    asks it to keep those bars' signals (the baseline sleeves, re-run under shocked costs by Monte Carlo)."""

    def __call__(
        self, symbols: Sequence[str], bars: Sequence[Bars], config: BacktestConfig, keep: bool = False
    ) -> list[BacktestResult | None]: ...


SCRIPT_BATCH_BACKTESTS = 64
"""A script strategy's permutation draws go through the sandbox in batches of about this many backtests (one
sandbox process per batch: its start-up, ~0.1-0.3 s, is paid once per batch instead of once per draw)."""


@dataclass(frozen=True)
class Sleeves:
    """The symbols of a run that backtest (in the config's order), their bars cut to the config's range,
    their positions in ``config.symbols`` and their baseline equity curves."""

    config: BacktestConfig
    symbols: tuple[str, ...]
    positions: tuple[int, ...]
    bars: tuple[Bars, ...]
    dates: tuple[NDArray[np.datetime64], ...]
    equity: tuple[NDArray[np.float64], ...]
    _total: list[NDArray[np.float64]] = field(default_factory=list, compare=False, repr=False)
    backtester: Backtester | None = field(default=None, compare=False, repr=False)  # a script strategy's

    def __len__(self) -> int:
        return len(self.symbols)

    @property
    def start_equity(self) -> float:
        return self.config.initial_cash * len(self.symbols)

    def total(self) -> NDArray[np.float64]:
        """The baseline portfolio's equity on the union of dates."""
        if not self._total:
            self._total.append(portfolio_curve(list(zip(self.dates, self.equity, strict=True)),
                                               self.config.initial_cash)[1])  # fmt: skip
        return self._total[0]


def sleeves(
    bars: Mapping[str, Bars],
    config: BacktestConfig,
    positions: range | None = None,
    backtester: Backtester | None = None,
) -> Sleeves:
    """Each symbol's baseline backtest, as a run's shard does it (bars cut to the range, a ``BarsError`` drops
    the symbol, as it makes it a per-symbol error in the run). ``positions``: only the symbols at these
    positions of ``config.symbols`` (a walk-forward task needs its own symbols only). ``backtester``: a script
    strategy's (a symbol its script fails on is dropped, as it is that symbol's error in the run)."""
    kept: list[tuple[str, int, Bars, NDArray[np.datetime64], NDArray[np.float64]]] = []
    cuts: list[tuple[str, int, Bars]] = []
    for position, symbol in enumerate(config.symbols):
        if positions is not None and position not in positions:
            continue
        own = bars.get(symbol)
        if own is None:
            continue
        try:
            cut = own.between(config.start_date, config.end_date)
            if backtester is None:
                result = run_backtest(cut, config)
        except BarsError:
            continue
        if backtester is None:
            kept.append((symbol, position, cut, result.dates, result.equity))
        else:
            cuts.append((symbol, position, cut))
    if backtester is not None and cuts:
        results = backtester([c[0] for c in cuts], [c[2] for c in cuts], config, keep=True)
        for (symbol, position, cut), got in zip(cuts, results, strict=True):
            if got is not None:
                kept.append((symbol, position, cut, got.dates, got.equity))
    return Sleeves(
        config,
        tuple(k[0] for k in kept),
        tuple(k[1] for k in kept),
        tuple(k[2] for k in kept),
        tuple(k[3] for k in kept),
        tuple(k[4] for k in kept),
        backtester=backtester,
    )


def _clean(value: Any) -> Any:
    """JSON-safe: non-finite floats become None, recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value
