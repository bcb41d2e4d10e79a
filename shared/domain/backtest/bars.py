"""Bars as the engine takes them: plain aligned numpy arrays, checked once."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from typing import Any

import numpy as np
from numpy.typing import NDArray


class BarsError(ValueError):
    """The arrays do not describe a usable bar series (the message names the array and the bar)."""


@dataclass(frozen=True)
class Bars:
    """Daily OHLCV bars, oldest first. ``dates`` is ``datetime64[D]``, strictly increasing."""

    open: NDArray[np.float64]
    high: NDArray[np.float64]
    low: NDArray[np.float64]
    close: NDArray[np.float64]
    volume: NDArray[np.float64]
    dates: NDArray[np.datetime64]

    def __len__(self) -> int:
        return len(self.close)

    @classmethod
    def from_arrays(
        cls,
        *,
        open: Any,
        high: Any,
        low: Any,
        close: Any,
        volume: Any,
        dates: Sequence[date | str] | NDArray[Any],
    ) -> Bars:
        """Convert and validate: equal lengths, finite positive prices, non-negative volume, sorted dates.

        The arrays are always fresh, writable, contiguous float64 copies: the compiled kernels then see one
        array type (a read-only view, as pandas hands out, would compile and cache a second variant).
        """
        arrays = {
            name: np.array(values, dtype=np.float64, order="C", copy=True)
            for name, values in (("open", open), ("high", high), ("low", low), ("close", close), ("volume", volume))
        }
        try:
            day = np.asarray(dates, dtype="datetime64[D]")
        except (TypeError, ValueError) as exc:
            raise BarsError(f"dates: not convertible to dates ({exc})") from None
        n = len(day)
        if n == 0:
            raise BarsError("dates: no bars")
        for name, values in arrays.items():
            if values.ndim != 1 or len(values) != n:
                raise BarsError(f"{name}: expected {n} values (one per date), got shape {values.shape}")
            bad = ~np.isfinite(values) | (values < 0 if name == "volume" else values <= 0)
            if bad.any():
                i = int(np.argmax(bad))
                what = "finite and >= 0" if name == "volume" else "finite and > 0"
                raise BarsError(f"{name}[{i}] ({day[i]}): {values[i]!r} is not {what}")
        if n > 1 and not (day[1:] > day[:-1]).all():
            i = int(np.argmax(~(day[1:] > day[:-1]))) + 1
            raise BarsError(f"dates[{i}] ({day[i]}): dates must be strictly increasing")
        return cls(dates=day, **arrays)

    def between(self, start: date | None, end: date | None) -> Bars:
        """The bars with ``start <= date <= end`` (either bound optional)."""
        lo = 0 if start is None else int(np.searchsorted(self.dates, np.datetime64(start, "D"), side="left"))
        hi = len(self) if end is None else int(np.searchsorted(self.dates, np.datetime64(end, "D"), side="right"))
        if lo == 0 and hi == len(self):
            return self
        if hi <= lo:
            raise BarsError(f"no bars between {start} and {end}")
        return Bars(
            open=self.open[lo:hi],
            high=self.high[lo:hi],
            low=self.low[lo:hi],
            close=self.close[lo:hi],
            volume=self.volume[lo:hi],
            dates=self.dates[lo:hi],
        )
