"""The read-only float series scripts get: their bars (``open`` .. ``volume``) and ``ta``'s float results.

A ``Series`` is an ``array('d')`` that refuses every change. Built from float64 bytes with one copy, it costs
no Python object per value until the script indexes or iterates it. ``ta`` reads its buffer in one copy too.
A tuple of 2,520 floats costs ~35 µs to build; five of them a symbol were most of a cheap script's cost.

To a script it reads like a tuple of floats: ``len``, indexing (a ``float``), slicing, iteration, ``sum``,
``max``, ``sorted``, ``in``, ``+`` and ``*`` (those give new arrays), comparison, and the methods in
:data:`SCRIPT_ATTRIBUTES`. Slices, ``+`` and ``*`` give a plain ``array('d')``: the script's own copy.

Immutability has two layers. Scripts reach attributes only through the policy's guarded ``getattr``, which allows
:data:`SCRIPT_ATTRIBUTES` on these arrays and nothing else: no ``append``, no ``frombytes``, no ``buffer_info``
(an address). Below that, every mutating method of ``array`` is overridden here to raise, item and slice assignment
are refused by RestrictedPython's write guard, and ``+=`` / ``*=`` build a new array, as for a tuple. The one way
left to write is the buffer protocol, and nothing a script can reach writes through it.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable
from typing import Any, NoReturn, SupportsIndex

# What a script may read on a Series (or a plain array('d') it made by slicing one): the tuple-like methods and
# plain facts. Everything else of array is refused by the policy's guarded getattr.
SCRIPT_ATTRIBUTES = frozenset({"count", "index", "tolist", "itemsize", "typecode"})


class Series(array):  # (no array[float] at run time in 3.11)
    """An immutable ``array('d')``. Build with :func:`series_from_bytes`; scripts cannot build one."""

    __slots__ = ()

    def _refuse(self, *args: object, **kwargs: object) -> NoReturn:
        raise TypeError("'Series' object is read-only (bars and ta results cannot be changed)")

    append = extend = insert = pop = remove = reverse = byteswap = _refuse
    frombytes = fromlist = fromunicode = fromfile = tofile = buffer_info = _refuse
    __setitem__ = __delitem__ = _refuse

    def __iadd__(self, other: Any) -> array[float]:  # type: ignore[override,misc]
        return array.__add__(self, other)

    def __imul__(self, count: int) -> array[float]:  # type: ignore[override]
        return array.__mul__(self, count)

    def __reduce_ex__(self, protocol: SupportsIndex) -> Any:
        return (series_from_bytes, (self.tobytes(),))

    def __copy__(self) -> Series:
        return self

    def __deepcopy__(self, memo: Any) -> Series:
        return self


def series_from_bytes(data: Any) -> Series:
    """A Series of the float64 values in ``data`` (any C-contiguous buffer, native byte order): one copy of the
    bytes, no Python object per value."""
    values = Series("d")
    with memoryview(data) as view, view.cast("B") as raw:  # frombytes takes only byte-formatted buffers
        array.frombytes(values, raw)
    return values


def series_of(values: Iterable[float]) -> Series:
    """A Series of plain floats (tests and trusted code; scripts never call this)."""
    return series_from_bytes(array("d", values))
