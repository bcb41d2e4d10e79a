"""Adjusting bars for corporate actions: splits and cash dividends, backward-adjusted (pure code, no database)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from shared.marketdata.series import Columns

ADJUSTMENTS: tuple[str, ...] = ("none", "splits", "total_return")


@dataclass(frozen=True)
class Actions:
    """One symbol's corporate actions, each kind sorted by day (epoch days of the ex-date / effective date).

    ``split_ratios``: new shares per old share (4.0 for a 4-for-1 split, 0.1 for a 1-for-10 reverse split).
    ``dividend_amounts``: cash per share as paid on the day (not split-adjusted)."""

    split_days: NDArray[np.int64]
    split_ratios: NDArray[np.float64]
    dividend_days: NDArray[np.int64]
    dividend_amounts: NDArray[np.float64]

    @classmethod
    def empty(cls) -> Actions:
        return cls(np.empty(0, np.int64), np.empty(0, np.float64), np.empty(0, np.int64), np.empty(0, np.float64))

    def __bool__(self) -> bool:
        return bool(len(self.split_days) or len(self.dividend_days))


def adjust(columns: Columns, days: NDArray[np.int64], actions: Actions, adjustment: str) -> Columns:
    """``columns`` backward-adjusted (the latest bars keep their traded prices): prices times the bar's price factor,
    volume times its volume factor (see :func:`adjustment_factors`). ``days`` is each bar's local trading date as epoch
    days. New arrays; the input itself when nothing changes (``"none"``, or no action after the first bar)."""
    if adjustment == "none":
        return columns
    price, volume = adjustment_factors(days, actions, columns.close, adjustment)
    if not len(price) or (np.all(price == 1.0) and np.all(volume == 1.0)):
        return columns
    return Columns(
        columns.ts,
        columns.open * price,
        columns.high * price,
        columns.low * price,
        columns.close * price,
        columns.volume * volume,
    )


def adjustment_factors(
    days: NDArray[np.int64], actions: Actions, close: NDArray[np.float64], adjustment: str
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Each bar's (price factor, volume factor) under ``adjustment``, from its epoch day in ``days`` (non-decreasing)
    and the raw (as-traded) ``close`` of each bar.

    A split of ratio ``r`` on day ``d`` (its ex-date: the first bar with ``days >= d`` trades on the new basis) divides
    the prices of every earlier bar by ``r`` and multiplies its volume by ``r``; several splits compound. With
    ``"total_return"``, a cash dividend ``D`` with ex-date ``d`` also multiplies the prices (not the volume) of every
    earlier bar by ``1 - D / C``, ``C`` the raw close of the last bar before ``d`` (the CRSP / Yahoo factor). ``D`` is
    as paid and ``C`` as traded, so both are on the same share basis and need no split correction, except when a split
    falls between that bar and ``d`` (same-day split and dividend): then ``C`` is first put on the new basis. Skipped:
    a dividend with no earlier bar, one that is not in ``(0, C)`` (a bad record would make prices zero or negative),
    a split whose ratio is not a positive finite number."""
    days = np.asarray(days, dtype=np.int64)
    close = np.asarray(close, dtype=np.float64)
    if len(days) != len(close):
        raise ValueError(f"{len(days)} days for {len(close)} bars")
    if adjustment not in ADJUSTMENTS:
        raise ValueError(f"unknown adjustment {adjustment!r}; expected one of {', '.join(ADJUSTMENTS)}")
    ones = np.ones(len(days))
    if adjustment == "none":
        return ones, ones
    split_days, ratios = _sorted(actions.split_days, actions.split_ratios)
    valid = np.isfinite(ratios) & (ratios > 0)
    split_days, ratios = split_days[valid], ratios[valid]
    splits_after = _suffix_products(ratios)  # [k]: the product of the ratios of splits k, k + 1, ...
    volume = splits_after[np.searchsorted(split_days, days, side="right")]
    price = 1.0 / volume
    if adjustment == "splits" or not len(days):
        return price, volume
    dividend_days, amounts = _sorted(actions.dividend_days, actions.dividend_amounts)
    before = np.searchsorted(days, dividend_days, side="left") - 1  # the last bar before each ex-date
    has_bar = before >= 0
    dividend_days, amounts, before = dividend_days[has_bar], amounts[has_bar], before[has_bar]
    basis = splits_after[np.searchsorted(split_days, dividend_days, side="right")] / volume[before]  # 1 but for a split
    raw_close = close[before] * basis
    valid = (amounts > 0) & (amounts < raw_close)
    factors = 1.0 - amounts[valid] / raw_close[valid]
    price = price * _suffix_products(factors)[np.searchsorted(dividend_days[valid], days, side="right")]
    return price, volume


def _sorted(days: NDArray[np.int64], values: NDArray[np.float64]) -> tuple[NDArray[np.int64], NDArray[np.float64]]:
    order = np.argsort(days, kind="stable")
    return np.asarray(days, dtype=np.int64)[order], np.asarray(values, dtype=np.float64)[order]


def _suffix_products(values: NDArray[np.float64]) -> NDArray[np.float64]:
    """``[k]``: the product of ``values[k:]``, one value longer than ``values`` (the last is 1)."""
    return np.r_[np.cumprod(values[::-1])[::-1], 1.0]
