"""How a search is cut into work: walk-forward windows on the symbols' bar-date calendar and slices of combos.

Walk-forward: windows of ``in_sample`` / ``out_of_sample`` bars, rolling or anchored, as
``shared.domain.robustness.windows``. The in-sample tasks score every combo on bars of the in-sample dates only;
the choice per window is the best combo there under the constraints; out of sample, the choice trades from a flat
position from the window's first bar (its indicators warmed on the past bars, never on later ones). The calendar is
the symbols' distinct bar *days*, intraday bars too (a config's range is whole days, ``Bars.between``), so intraday
windows count trading days, not bars.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from shared.domain import robustness as val
from shared.domain.search.spec import WalkForward

GRID_MIN_SLICE_COMBOS = 100
"""A dual-SMA slice holds at least this many combos: each grid call per symbol has a fixed cost (averages, bins,
sizing) that thin slices of many symbols would pay over and over."""


@dataclass(frozen=True)
class WindowDates:
    in_sample: tuple[dt.date, dt.date]
    out_of_sample: tuple[dt.date, dt.date]


def window_dates(calendar: Sequence[dt.date], wf: WalkForward) -> list[WindowDates]:
    """The windows of ``shared.domain.robustness.windows`` on the calendar (sorted distinct bar dates), as dates."""
    spec = val.WalkForwardSpec(
        in_sample=max(wf.in_sample, 50), out_of_sample=max(wf.out_of_sample, 10), anchored=wf.anchored
    )
    spec = spec.model_copy(update={"in_sample": wf.in_sample, "out_of_sample": wf.out_of_sample})
    return [
        WindowDates((calendar[w.in_start], calendar[w.in_end - 1]), (calendar[w.in_end], calendar[w.out_end - 1]))
        for w in val.windows(len(calendar), spec)
    ]


@dataclass(frozen=True)
class Task:
    """One shard's work: combos ``[lo, hi)`` scored on window ``window`` (0 without walk-forward) between
    ``start`` and ``end`` (None: the config's own range)."""

    window: int
    lo: int
    hi: int
    start: str | None = None
    end: str | None = None
    oos_start: str | None = None
    oos_end: str | None = None
    work: int = 0  # backtests: combos x symbols

    def as_dict(self) -> dict[str, Any]:
        return {"kind": "optimization", **vars(self)}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Task:
        return cls(**{k: v for k, v in raw.items() if k != "kind"})


def plan(
    n_combos: int, n_symbols: int, slice_backtests: int, windows: Sequence[WindowDates] | None, min_combos: int = 1
) -> list[Task]:
    """Slices of about ``slice_backtests`` backtests (at least ``min_combos`` combos), per window."""
    per_slice = max(1, min_combos, slice_backtests // max(1, n_symbols))
    cuts = [(lo, min(lo + per_slice, n_combos)) for lo in range(0, n_combos, per_slice)]
    if windows is None:
        return [Task(0, lo, hi, work=(hi - lo) * n_symbols) for lo, hi in cuts]
    return [
        Task(
            w,
            lo,
            hi,
            str(wd.in_sample[0]),
            str(wd.in_sample[1]),
            str(wd.out_of_sample[0]),
            str(wd.out_of_sample[1]),
            (hi - lo) * n_symbols,
        )
        for w, wd in enumerate(windows)
        for lo, hi in cuts
    ]
