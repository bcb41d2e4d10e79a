"""What a strategy script's sandbox run gives back, once the trusted parent has re-checked it.

The sandbox child checks a strategy script's ``entries``/``exits`` or ``position`` by exact type and length
(shared/sandbox/strategy_output.py) and sends them packed (bits, float64 bytes); the parent (shared/sandbox/runner.py)
decodes and checks them again into these objects. Nothing here is a script's object: only numpy arrays built by the
parent from bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from shared.infra.security import Incident


@dataclass(frozen=True)
class ScriptSignals:
    """One symbol's signals: ``n`` bars, the script's ``warmup`` (first bar its signals mean anything) and
    either ``entries`` and ``exits`` (bool arrays) or ``position`` (float64 targets in [-1, 1])."""

    n: int
    warmup: int
    entries: NDArray[np.bool_] | None = None
    exits: NDArray[np.bool_] | None = None
    position: NDArray[np.float64] | None = None

    def __post_init__(self) -> None:
        series = (self.entries, self.exits) if self.position is None else (self.position,)
        if self.position is not None and (self.entries is not None or self.exits is not None):
            raise ValueError("signals are entries and exits, or a position, not both")
        if any(s is None or s.shape != (self.n,) for s in series):
            raise ValueError(f"every signal series needs {self.n} values")


@dataclass(frozen=True)
class StrategyOutcome:
    """One symbol's answer from the sandbox: its signals, or an error ``{type, message, line}``; plus what the
    sandbox rejected while computing it."""

    symbol: str
    signals: ScriptSignals | None
    error: dict[str, Any] | None
    incidents: tuple[Incident, ...] = field(default=(), compare=False)
