"""The indicator library user scripts import (``from ta import sma, rsi`` or ``import ta``).

Thin wrappers over the NumPy core in ``shared/domain/indicators/core.py`` (the backtest engine's indicators too;
their definitions: ``shared/domain/indicators/__init__.py``): validate untrusted input in plain Python,
hand the core float64 arrays, and give back plain Python data, so that no NumPy object (array, scalar, dtype,
function, module, exception) is ever reachable from a script:

* a float series comes back as a fresh read-only ``Series`` (``shared/domain/sandbox/series.py``: an immutable
  ``array('d')``, the type of the script's bars), copied from the core's buffer in one go, with no Python object
  per value until the script reads one; the cross detectors give tuples of ``bool``; several series come as a
  tuple of them;
* a Series (or a plain ``array('d')``, what slicing one gives) is read in one copy of its buffer; a tuple or list
  is checked item by item, by type;
* invalid input raises a plain ``TypeError`` / ``ValueError`` whose only argument is a str built here
  (no NumPy repr), raised before any array exists; a failure inside the core (out of memory, or a bug)
  is replaced by a plain ``MemoryError`` / ``RuntimeError`` raised *after* the handler, so the NumPy
  exception is not even its ``__context__``;
* the module's own names are the public functions (``__all__``, a tuple) and private ``_`` names,
  which RestrictedPython refuses to scripts; the sandbox still exposes only ``__all__`` through a
  read-only facade. The module has no state a call could change.

Bounds (the script controls every argument): a series has at most 1,000,000 values and a period is at
most 1,000,000; items must be exactly ``float`` or ``int`` (``bool`` refused, ints beyond the float
range refused), checked by type without calling any method of the item. Every function does O(n) work
for n values whatever the period, and its temporary memory is at most 24 float64 arrays of length n
(correlation; 12 for stdev, zscore and bollinger, 8 for the rest) besides the result (32 bytes a value
per result tuple); a period longer than the series yields all NaN without allocating anything
period-sized.
"""

import collections.abc as _abc
import operator as _operator
import struct as _struct
from array import array as _PlainArray

import numpy as _np

from shared.domain.indicators import core as _core
from shared.domain.sandbox.series import Series as _Series
from shared.domain.sandbox.series import series_from_bytes as _series_from_bytes

__all__ = (
    "atr",
    "bollinger",
    "correlation",
    "crossover",
    "crossunder",
    "drawdown",
    "ema",
    "highest",
    "log_returns",
    "lowest",
    "macd",
    "pct_change",
    "rolling_max",
    "rolling_min",
    "rolling_sum",
    "rsi",
    "sma",
    "stdev",
    "true_range",
    "wilder",
    "wma",
    "zscore",
)

_MAX_LENGTH = 1_000_000  # values per series: ~4,000 years of daily bars, ~10 years of 1-minute bars
_MAX_PERIOD = _MAX_LENGTH
_FLOAT_MAX = 1.7976931348623157e308
_TYPE_NAME = type.__dict__["__name__"]  # type's own getter: no metaclass property can answer instead

_Numbers = _abc.Sequence[float]  # a Series, array("d"), tuple or list of floats or ints: checked at run time (_series)
_Floats = _Series
_Bools = tuple[bool, ...]
_Array = _np.ndarray


# ---------------------------------------------------------------------------------------------
# Validation (plain Python; nothing here touches NumPy or calls a method of a script's object)
# ---------------------------------------------------------------------------------------------


def _kind(obj: object) -> str:
    name: str = _TYPE_NAME.__get__(type(obj))
    return name if len(name) <= 40 else name[:40] + "..."


def _series(values: object, where: str, name: str) -> bytes:
    """The values as packed float64 bytes.

    A Series, or a plain ``array('d')`` (a slice of one), is its buffer, copied once. A tuple or list must hold
    exactly floats or ints: a C-level scan when every item is a float (no per-item Python code), else each item is
    checked by the identity of its type and ints in range are converted.
    """
    if type(values) is _Series or (type(values) is _PlainArray and values.typecode == "d"):
        _length(len(values), where, name)
        return values.tobytes()
    if type(values) is list:
        values = tuple(values)  # a snapshot: what is checked is what gets packed
    if type(values) is not tuple:
        raise TypeError(f"ta.{where}(): {name} must be a series, tuple or list of numbers, not {_kind(values)}")
    n = _length(len(values), where, name)
    if _operator.countOf(map(type, values), float) != n:
        values = _mixed_numbers(values, where, name)
    return _struct.pack(f"{n}d", *values)


def _length(n: int, where: str, name: str) -> int:
    if n > _MAX_LENGTH:
        raise ValueError(f"ta.{where}(): {name} has {n:,} values; at most {_MAX_LENGTH:,} are allowed")
    return n


def _mixed_numbers(values: tuple[object, ...], where: str, name: str) -> tuple[float, ...]:
    converted: list[float] = []
    for index, item in enumerate(values):
        if type(item) is float:
            converted.append(item)
        elif type(item) is int:
            if not -_FLOAT_MAX <= item <= _FLOAT_MAX:
                raise ValueError(f"ta.{where}(): {name}[{index}] is an int too large for a float")
            converted.append(float(item))
        else:
            raise TypeError(f"ta.{where}(): {name}[{index}] must be a float or an int, not {_kind(item)}")
    return tuple(converted)


def _same_length(where: str, names: str, *series: bytes) -> None:
    lengths = {len(data) // 8 for data in series}
    if len(lengths) > 1:
        counts = " and ".join(f"{len(data) // 8:,}" for data in series)
        raise ValueError(f"ta.{where}(): {names} must have the same length (got {counts})")


def _int(value: object, where: str, name: str, low: int = 1, high: int = _MAX_PERIOD) -> int:
    if type(value) is not int:
        raise TypeError(f"ta.{where}(): {name} must be an int, not {_kind(value)}")
    if not low <= value <= high:
        shown = f", got {value}" if -(10**18) < value < 10**18 else ""
        raise ValueError(f"ta.{where}(): {name} must be between {low:,} and {high:,}{shown}")
    return value


def _real(value: object, where: str, name: str) -> float:
    if type(value) is float:
        return value
    if type(value) is int:
        if not -_FLOAT_MAX <= value <= _FLOAT_MAX:
            raise ValueError(f"ta.{where}(): {name} is an int too large for a float")
        return float(value)
    raise TypeError(f"ta.{where}(): {name} must be a float or an int, not {_kind(value)}")


# ---------------------------------------------------------------------------------------------
# The guarded call into the NumPy core
# ---------------------------------------------------------------------------------------------


def _array(data: bytes) -> _Array:
    return _np.frombuffer(data, dtype=_np.float64)  # read-only: the core never writes into its input


def _plain(result: _Array) -> _Series | tuple[bool, ...]:
    """A core result as plain data: a float64 array as a Series (one copy of its buffer), a bool array as a tuple
    of bools (read straight from its buffer)."""
    code = result.dtype.char
    if result.ndim != 1 or code not in "d?":
        raise TypeError("core result must be a 1-D float64 or bool array")
    if code == "d":
        return _series_from_bytes(_np.ascontiguousarray(result))
    return _struct.unpack_from(f"{result.shape[0]}?", result.data)


def _run(where: str, compute: _abc.Callable[[], _Array]) -> _Series | tuple[bool, ...]:
    failure = ""
    try:
        return _plain(compute())
    except MemoryError:
        failure = "memory"
    except Exception as exc:  # a bug: never hand NumPy's exception (or its attributes) to a script
        failure = _kind(exc)
    # Raised here, after the handler, so that the core's exception is not even the __context__.
    if failure == "memory":
        raise MemoryError(f"ta.{where}(): not enough memory for this input")
    raise RuntimeError(f"ta.{where}(): internal error ({failure})")


def _run_many(where: str, compute: _abc.Callable[[], tuple[_Array, ...]]) -> tuple[_Floats, ...]:
    failure = ""
    try:
        return tuple(_plain(part) for part in compute())  # type: ignore[misc]
    except MemoryError:
        failure = "memory"
    except Exception as exc:  # see _run
        failure = _kind(exc)
    if failure == "memory":
        raise MemoryError(f"ta.{where}(): not enough memory for this input")
    raise RuntimeError(f"ta.{where}(): internal error ({failure})")


# ---------------------------------------------------------------------------------------------
# Public functions. Every series result has the input's length, aligned bar for bar, NaN where the
# indicator is not defined yet (warm-up). README's "Indicator library (`ta`)" is the user reference.
# ---------------------------------------------------------------------------------------------


def sma(values: _Numbers, period: int) -> _Floats:
    """Simple moving average of the last ``period`` values; the first period - 1 are NaN."""
    data = _series(values, "sma", "values")
    n = _int(period, "sma", "period")
    return _run("sma", lambda: _core.sma(_array(data), n))  # type: ignore[return-value]


def ema(values: _Numbers, period: int) -> _Floats:
    """EMA, alpha 2/(period+1), seeded with the SMA of the first period values; first period - 1 NaN."""
    data = _series(values, "ema", "values")
    n = _int(period, "ema", "period")
    return _run("ema", lambda: _core.ema(_array(data), n))  # type: ignore[return-value]


def wma(values: _Numbers, period: int) -> _Floats:
    """Linearly weighted moving average (weights 1..period, newest heaviest); first period - 1 NaN."""
    data = _series(values, "wma", "values")
    n = _int(period, "wma", "period")
    return _run("wma", lambda: _core.wma(_array(data), n))  # type: ignore[return-value]


def wilder(values: _Numbers, period: int) -> _Floats:
    """Wilder's smoothing (RMA), alpha 1/period, SMA-seeded; first period - 1 NaN."""
    data = _series(values, "wilder", "values")
    n = _int(period, "wilder", "period")
    return _run("wilder", lambda: _core.wilder(_array(data), n))  # type: ignore[return-value]


def rsi(values: _Numbers, period: int = 14) -> _Floats:
    """Wilder's RSI (0..100); the first ``period`` are NaN; 100 without losses, 0 without gains, 50 if flat."""
    data = _series(values, "rsi", "values")
    n = _int(period, "rsi", "period")
    return _run("rsi", lambda: _core.rsi(_array(data), n))  # type: ignore[return-value]


def macd(values: _Numbers, fast: int = 12, slow: int = 26, signal: int = 9) -> tuple[_Floats, _Floats, _Floats]:
    """(line, signal, histogram); line from index slow - 1, signal and histogram from slow + signal - 2."""
    data = _series(values, "macd", "values")
    f = _int(fast, "macd", "fast")
    s = _int(slow, "macd", "slow")
    g = _int(signal, "macd", "signal")
    if f >= s:
        raise ValueError(f"ta.macd(): fast ({f}) must be shorter than slow ({s})")
    return _run_many("macd", lambda: _core.macd(_array(data), f, s, g))  # type: ignore[return-value]


def bollinger(values: _Numbers, period: int = 20, k: float = 2.0) -> tuple[_Floats, _Floats, _Floats]:
    """(upper, middle, lower): SMA +/- k population stdevs; the first period - 1 are NaN."""
    data = _series(values, "bollinger", "values")
    n = _int(period, "bollinger", "period")
    width = _real(k, "bollinger", "k")
    if not 0.0 <= width <= 1e6:
        raise ValueError("ta.bollinger(): k must be a finite number between 0 and 1,000,000")
    return _run_many("bollinger", lambda: _core.bollinger(_array(data), n, width))  # type: ignore[return-value]


def true_range(high: _Numbers, low: _Numbers, close: _Numbers) -> _Floats:
    """max(high - low, |high - previous close|, |low - previous close|); NaN at index 0."""
    h = _series(high, "true_range", "high")
    lo = _series(low, "true_range", "low")
    c = _series(close, "true_range", "close")
    _same_length("true_range", "high, low and close", h, lo, c)
    return _run("true_range", lambda: _core.true_range(_array(h), _array(lo), _array(c)))  # type: ignore[return-value]


def atr(high: _Numbers, low: _Numbers, close: _Numbers, period: int = 14) -> _Floats:
    """Average true range, Wilder-smoothed, seeded by the mean of true ranges 1..period; first period NaN."""
    h = _series(high, "atr", "high")
    lo = _series(low, "atr", "low")
    c = _series(close, "atr", "close")
    _same_length("atr", "high, low and close", h, lo, c)
    n = _int(period, "atr", "period")
    return _run("atr", lambda: _core.atr(_array(h), _array(lo), _array(c), n))  # type: ignore[return-value]


def stdev(values: _Numbers, period: int, ddof: int = 0) -> _Floats:
    """Rolling standard deviation dividing by period - ddof (0: population, 1: sample); first period - 1 NaN."""
    data = _series(values, "stdev", "values")
    n = _int(period, "stdev", "period")
    d = _int(ddof, "stdev", "ddof", 0, n - 1)
    return _run("stdev", lambda: _core.stdev(_array(data), n, d))  # type: ignore[return-value]


def zscore(values: _Numbers, period: int, ddof: int = 0) -> _Floats:
    """(value - SMA) / stdev over the last period values; NaN in warm-up and where the window is flat."""
    data = _series(values, "zscore", "values")
    n = _int(period, "zscore", "period")
    d = _int(ddof, "zscore", "ddof", 0, n - 1)
    return _run("zscore", lambda: _core.zscore(_array(data), n, d))  # type: ignore[return-value]


def pct_change(values: _Numbers, periods: int = 1) -> _Floats:
    """value / value ``periods`` bars earlier - 1; the first ``periods`` are NaN."""
    data = _series(values, "pct_change", "values")
    k = _int(periods, "pct_change", "periods")
    return _run("pct_change", lambda: _core.pct_change(_array(data), k))  # type: ignore[return-value]


def log_returns(values: _Numbers, periods: int = 1) -> _Floats:
    """ln(value / value ``periods`` bars earlier); the first ``periods`` are NaN."""
    data = _series(values, "log_returns", "values")
    k = _int(periods, "log_returns", "periods")
    return _run("log_returns", lambda: _core.log_returns(_array(data), k))  # type: ignore[return-value]


def rolling_sum(values: _Numbers, period: int) -> _Floats:
    """Sum of the last ``period`` values; the first period - 1 are NaN."""
    data = _series(values, "rolling_sum", "values")
    n = _int(period, "rolling_sum", "period")
    return _run("rolling_sum", lambda: _core.rolling_sum(_array(data), n))  # type: ignore[return-value]


def rolling_max(values: _Numbers, period: int) -> _Floats:
    """Largest of the last ``period`` values; the first period - 1 are NaN."""
    data = _series(values, "rolling_max", "values")
    n = _int(period, "rolling_max", "period")
    return _run("rolling_max", lambda: _core.rolling_max(_array(data), n))  # type: ignore[return-value]


def rolling_min(values: _Numbers, period: int) -> _Floats:
    """Smallest of the last ``period`` values; the first period - 1 are NaN."""
    data = _series(values, "rolling_min", "values")
    n = _int(period, "rolling_min", "period")
    return _run("rolling_min", lambda: _core.rolling_min(_array(data), n))  # type: ignore[return-value]


def highest(values: _Numbers, period: int) -> _Floats:
    """The same as rolling_max, under the name Pine Script and TA-Lib (MAX) users look for."""
    data = _series(values, "highest", "values")
    n = _int(period, "highest", "period")
    return _run("highest", lambda: _core.rolling_max(_array(data), n))  # type: ignore[return-value]


def lowest(values: _Numbers, period: int) -> _Floats:
    """The same as rolling_min, under the name Pine Script and TA-Lib (MIN) users look for."""
    data = _series(values, "lowest", "values")
    n = _int(period, "lowest", "period")
    return _run("lowest", lambda: _core.rolling_min(_array(data), n))  # type: ignore[return-value]


def correlation(a: _Numbers, b: _Numbers, period: int) -> _Floats:
    """Rolling Pearson correlation over ``period`` values; NaN in warm-up and where a window is flat."""
    x = _series(a, "correlation", "a")
    y = _series(b, "correlation", "b")
    _same_length("correlation", "a and b", x, y)
    n = _int(period, "correlation", "period")
    return _run("correlation", lambda: _core.correlation(_array(x), _array(y), n))  # type: ignore[return-value]


def drawdown(values: _Numbers) -> _Floats:
    """value / running maximum - 1 (0 at a new high, negative below it)."""
    data = _series(values, "drawdown", "values")
    return _run("drawdown", lambda: _core.drawdown(_array(data)))  # type: ignore[return-value]


def _cross(where: str, a: _Numbers, b: _Numbers | float) -> tuple[bytes, bytes | float]:
    x = _series(a, where, "a")
    if type(b) is float or type(b) is int:
        return x, _real(b, where, "b")
    if type(b) in (_Series, _PlainArray, tuple, list):
        y: bytes | float = _series(b, where, "b")
        _same_length(where, "a and b", x, y)  # type: ignore[arg-type]
        return x, y
    raise TypeError(f"ta.{where}(): b must be a series, tuple or list of numbers, or a number, not {_kind(b)}")


def _level(y: bytes | float) -> _Array | float:
    return _array(y) if isinstance(y, bytes) else y


def crossover(a: _Numbers, b: _Numbers | float) -> _Bools:
    """True where a crosses above b (a > b now, a <= b on the previous bar); b a series or a number."""
    x, y = _cross("crossover", a, b)
    return _run("crossover", lambda: _core.crossover(_array(x), _level(y)))  # type: ignore[return-value]


def crossunder(a: _Numbers, b: _Numbers | float) -> _Bools:
    """True where a crosses below b (a < b now, a >= b on the previous bar); b a series or a number."""
    x, y = _cross("crossunder", a, b)
    return _run("crossunder", lambda: _core.crossunder(_array(x), _level(y)))  # type: ignore[return-value]
