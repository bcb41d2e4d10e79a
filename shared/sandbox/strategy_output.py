"""A strategy script's output, checked in the sandbox child by exact type and length and packed for the parent.

Either ``entries`` and ``exits`` (booleans) or ``position`` (numbers in [-1, 1]), one per bar, and optionally
``warmup``. The parent (shared/sandbox/runner.py) decodes and checks all of it again: nothing the child says is
trusted.
"""

from __future__ import annotations

import base64
import sys
from array import array
from typing import Any

from shared.domain.sandbox.policy import ENTRIES_NAME, EXITS_NAME, POSITION_NAME, WARMUP_NAME
from shared.domain.sandbox.series import Series

_MISSING = object()


class SignalError(ValueError):
    """A strategy script's series are not what the contract asks for (the message names the problem)."""


def pack_bits(values: tuple[bool, ...] | list[bool]) -> str:
    """Booleans as base64 of packed bits, least significant bit first (8 bars a byte)."""
    out = bytearray((len(values) + 7) // 8)
    for i, value in enumerate(values):
        if value:
            out[i >> 3] |= 1 << (i & 7)
    return base64.b64encode(bytes(out)).decode("ascii")


def _bools(name: str, value: Any, n: int) -> str:
    kind = type(value)
    if kind is not tuple and kind is not list:
        raise SignalError(f"{name} must be a tuple (or list) of booleans, one per bar, not {kind.__name__}")
    if len(value) != n:
        raise SignalError(f"{name} has {len(value):,} values; expected {n:,} (one per bar)")
    for i, item in enumerate(value):
        if type(item) is not bool:  # checked by type: no __bool__ of a script's object ever runs here
            raise SignalError(f"{name}[{i}] is {type(item).__name__}, not bool (True or False)")
    return pack_bits(value)


def _positions(value: Any, n: int) -> str:
    kind = type(value)
    if kind is Series or (kind is array and value.typecode == "d"):  # a ta result, or a slice of one: its buffer
        return _series_positions(value, n)
    if kind is not tuple and kind is not list:
        raise SignalError(f"{POSITION_NAME} must be a series, tuple or list of numbers, one per bar, "
                          f"not {kind.__name__}")  # fmt: skip
    if len(value) != n:
        raise SignalError(f"{POSITION_NAME} has {len(value):,} values; expected {n:,} (one per bar)")
    numbers = array("d")
    for i, item in enumerate(value):
        if type(item) is not float and type(item) is not int:
            raise SignalError(f"{POSITION_NAME}[{i}] is {type(item).__name__}, not a number")
        try:
            number = float(item)
        except OverflowError:
            raise SignalError(f"{POSITION_NAME}[{i}] is too large") from None
        if not -1.0 <= number <= 1.0:  # NaN fails this too
            raise SignalError(f"{POSITION_NAME}[{i}] is {number!r}; a target position is between -1 and 1")
        numbers.append(number)
    if sys.byteorder != "little":  # pragma: no cover - the wire format is little-endian
        numbers.byteswap()
    return base64.b64encode(numbers.tobytes()).decode("ascii")


def _series_positions(value: array[float], n: int) -> str:
    if len(value) != n:
        raise SignalError(f"{POSITION_NAME} has {len(value):,} values; expected {n:,} (one per bar)")
    numbers = array("d", value)  # a copy: what is checked is what is sent
    for i, number in enumerate(numbers):
        if not -1.0 <= number <= 1.0:  # NaN fails this too
            raise SignalError(f"{POSITION_NAME}[{i}] is {number!r}; a target position is between -1 and 1")
    if sys.byteorder != "little":  # pragma: no cover - the wire format is little-endian
        numbers.byteswap()
    return base64.b64encode(numbers.tobytes()).decode("ascii")


def check_signals(namespace: dict[str, Any], n: int) -> dict[str, Any]:
    """A strategy script's output, checked by exact type and length and encoded compactly for the parent.

    Either ``entries`` and ``exits`` (booleans) or ``position`` (numbers in [-1, 1]), one per bar; optional
    ``warmup`` (int, the first bar the signals mean anything, default 0). The parent checks all of it again.
    """
    entries = namespace.get(ENTRIES_NAME, _MISSING)
    exits = namespace.get(EXITS_NAME, _MISSING)
    position = namespace.get(POSITION_NAME, _MISSING)
    warmup = namespace.get(WARMUP_NAME, 0)
    if type(warmup) is not int:
        raise SignalError(f"{WARMUP_NAME} must be an int, not {type(warmup).__name__}")
    if not 0 <= warmup < max(n, 1):
        raise SignalError(f"{WARMUP_NAME} is {warmup:,}; it must be a bar index from 0 to {max(n - 1, 0):,}")
    signals: dict[str, Any] = {"n": n, "warmup": warmup}
    if position is not _MISSING:
        if entries is not _MISSING or exits is not _MISSING:
            raise SignalError(f"assign either `{ENTRIES_NAME}` and `{EXITS_NAME}`, or `{POSITION_NAME}`, not both")
        signals[POSITION_NAME] = _positions(position, n)
        return signals
    if entries is _MISSING and exits is _MISSING:
        raise SignalError(
            f"the strategy script assigned neither `{ENTRIES_NAME}` and `{EXITS_NAME}` nor `{POSITION_NAME}`"
        )
    if entries is _MISSING or exits is _MISSING:
        given, absent = (ENTRIES_NAME, EXITS_NAME) if exits is _MISSING else (EXITS_NAME, ENTRIES_NAME)
        raise SignalError(f"the strategy script assigned `{given}` but not `{absent}`")
    signals[ENTRIES_NAME] = _bools(ENTRIES_NAME, entries, n)
    signals[EXITS_NAME] = _bools(EXITS_NAME, exits, n)
    return signals
