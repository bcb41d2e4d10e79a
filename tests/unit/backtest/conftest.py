"""Shared data for the backtest unit tests: backtesting.py's GOOG bars (test-only dependency) as Bars."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import pytest

from shared.domain.backtest import Bars


def bars_from_frame(df: pd.DataFrame, timeframe: str = "1d") -> Bars:
    """A backtesting.py-style frame (``Open``, ..., ``Volume``, a DatetimeIndex) as Bars at ``timeframe``."""
    intraday = timeframe not in ("1d", "1w", "1mo")
    return Bars.from_arrays(
        open=df["Open"].to_numpy(float),
        high=df["High"].to_numpy(float),
        low=df["Low"].to_numpy(float),
        close=df["Close"].to_numpy(float),
        volume=df["Volume"].to_numpy(float),
        dates=df.index.values if intraday else df.index.values.astype("datetime64[D]"),
        timeframe=timeframe,
    )


@pytest.fixture(scope="session")
def goog() -> pd.DataFrame:
    from backtesting.test import GOOG

    frame: pd.DataFrame = GOOG.copy()
    return frame


@pytest.fixture(scope="session")
def goog_bars(goog: pd.DataFrame) -> Bars:
    return bars_from_frame(goog)


def make_bars(
    close: Sequence[float] | np.ndarray,
    *,
    open_: Sequence[float] | np.ndarray | None = None,
    volume: Sequence[float] | np.ndarray | None = None,
    start: str = "2024-01-01",
) -> Bars:
    """Hand-made bars on consecutive calendar days; high/low bracket open and close."""
    c = np.asarray(close, dtype=float)
    o = c.copy() if open_ is None else np.asarray(open_, dtype=float)
    v = np.full(len(c), 1e6) if volume is None else np.asarray(volume, dtype=float)
    dates = np.datetime64(start, "D") + np.arange(len(c))
    return Bars.from_arrays(open=o, high=np.maximum(o, c), low=np.minimum(o, c), close=c, volume=v, dates=dates)
