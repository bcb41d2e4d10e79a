"""Keyset pagination: the one way every list of the API pages.

Every list takes ``limit`` and ``cursor`` query parameters and answers ``next_cursor`` (``null`` on the last page):
pass it back as ``cursor`` for the next page. A page starts strictly after the previous page's last row in the list's
order (a unique sort key), so rows added or removed between two requests never shift a page: no row is seen twice
and none of the rows that stay is skipped, and a page costs the same at any depth (an index range, not an offset).

A cursor is opaque to clients: the URL-safe, unpadded base64 of the JSON list of the last row's sort key. One that
does not decode to the list's key is a 422 naming the field ``cursor``.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from sqlalchemy import Select, and_, false, or_, tuple_
from sqlalchemy.orm import Session

from shared.errors import ValidationFailed

T = TypeVar("T")
Parser = Callable[[Any], Any]  # one JSON value of a cursor -> the column's Python value; raises ValueError if bad

INVALID = "invalid cursor; use next_cursor from the previous page"


def text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("not a string")
    return value


def number(value: Any) -> float | None:
    """A float sort value (``None``: SQL NULL); JSON keeps a float's exact digits."""
    if value is None:
        return None
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise ValueError("not a number")
    return float(value)


def integer(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError("not an integer")
    return value


def uuid_value(value: Any) -> uuid.UUID:
    return uuid.UUID(text(value))


def timestamp(value: Any) -> dt.datetime:
    return dt.datetime.fromisoformat(text(value))


def day(value: Any) -> dt.date:
    return dt.date.fromisoformat(text(value))


def _json_default(value: Any) -> Any:
    if isinstance(value, dt.date | dt.datetime):  # datetime is a date: both as ISO 8601
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    raise TypeError(f"cannot put {type(value).__name__} in a cursor")


def encode_cursor(values: Sequence[Any]) -> str:
    raw = json.dumps(list(values), separators=(",", ":"), default=_json_default).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str, parsers: Sequence[Parser]) -> tuple[Any, ...]:
    """The sort key a cursor carries, each value parsed; a 422 on ``cursor`` if it is not one of this list's."""
    try:
        values = json.loads(base64.b64decode(cursor + "=" * (-len(cursor) % 4), altchars=b"-_", validate=True))
        if not isinstance(values, list) or len(values) != len(parsers):
            raise ValueError("wrong arity")
        return tuple(parse(v) for parse, v in zip(parsers, values, strict=True))
    except (binascii.Error, ValueError, TypeError, UnicodeDecodeError):
        raise ValidationFailed.for_field("cursor", INVALID) from None


@dataclass(frozen=True)
class Sort:
    """One sort column of a list whose columns do not all run the same way: its direction, and whether it may be
    NULL (NULLs sort last, as ``nulls_last()``)."""

    column: Any
    descending: bool = False
    nullable: bool = False

    def ordered(self) -> Any:
        order = self.column.desc() if self.descending else self.column.asc()
        return order.nulls_last() if self.nullable else order

    def equal(self, value: Any) -> Any:
        return self.column.is_(None) if value is None else self.column == value

    def beyond(self, value: Any) -> Any:
        """Rows strictly after ``value`` in this column's order (NULLs last: nothing is after a NULL)."""
        if value is None:
            return false()
        later = self.column < value if self.descending else self.column > value
        return or_(later, self.column.is_(None)) if self.nullable else later


@dataclass(frozen=True)
class Keyset(Generic[T]):
    """A list's order: its sort columns (unique together), how to read a cursor's values back, and a row's key.

    ``descending``: newest first (every column descending: PostgreSQL compares the row value as a whole). Columns
    given as :class:`Sort` may each run their own way and be NULL; the page then starts after the cursor by the
    lexicographic rule (a column beyond the cursor's value, every earlier one equal to it)."""

    columns: tuple[Any, ...]
    parsers: tuple[Parser, ...]
    key: Callable[[T], Sequence[Any]]
    descending: bool = False

    def after(self, query: Select[Any], cursor: str | None) -> Select[Any]:
        """``query`` ordered by the key and starting after ``cursor`` (from the first row without one)."""
        return self.after_key(query, decode_cursor(cursor, self.parsers) if cursor else None)

    def after_key(self, query: Select[Any], values: Sequence[Any] | None) -> Select[Any]:
        """``query`` ordered by the key and starting after the row whose key is ``values`` (None: from the first)."""
        sorts = [c if isinstance(c, Sort) else Sort(c, self.descending) for c in self.columns]
        if values is not None:
            if all(type(c) is not Sort for c in self.columns):
                row, start = tuple_(*self.columns), tuple_(*values)
                query = query.where(row < start if self.descending else row > start)
            else:
                query = query.where(
                    or_(
                        *(
                            and_(*(s.equal(v) for s, v in zip(sorts[:i], values[:i], strict=True)), sort.beyond(value))
                            for i, (sort, value) in enumerate(zip(sorts, values, strict=True))
                        )
                    )
                )
        return query.order_by(*(s.ordered() for s in sorts))


def page(
    session: Session, query: Select[Any], keyset: Keyset[T], *, limit: int, cursor: str | None, scalars: bool = True
) -> tuple[list[T], str | None]:
    """One page of ``query`` (at most ``limit`` rows) and the next page's cursor (None on the last page).

    ``scalars=False``: rows of several entities (``select(A, B)``), each a tuple given to the key as it is."""
    ordered = keyset.after(query, cursor).limit(limit + 1)
    rows: list[Any] = list(session.scalars(ordered)) if scalars else [tuple(r) for r in session.execute(ordered)]
    return rows[:limit], next_cursor(rows, limit, keyset.key)


def next_cursor(rows: Sequence[T], limit: int, key: Callable[[T], Sequence[Any]]) -> str | None:
    """The cursor after ``rows[limit - 1]`` when a page query fetched more than ``limit`` rows (limit + 1 asked)."""
    return encode_cursor(key(rows[limit - 1])) if len(rows) > limit else None
