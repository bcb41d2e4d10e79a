"""Saved universes: a user's named list of symbols, CRUD, and resolution for runs (``"universe": "<id or name>"``).

Symbols are checked as a run's are: each one upper-cased and matched against the symbol pattern, duplicates
dropped (first place kept), at most ``max_symbols`` of them, and each must be a known symbol: an unknown one is a
422 naming ``symbols[i]``. ``version`` counts the changes; an update may name the version it expects (409 if the
universe changed meanwhile). Someone else's universe is a 404, as for scripts.

A universe carries the ``timeframe`` it is meant for (``1d`` unless given), and may be taken as of a date
(:func:`resolve_as_of`): only its members listed on that day (shared.marketdata.listings), so that a backtest over a
past date sees the symbols that traded then, delisted ones included, and not those listed later.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from shared.accounts.access import Principal, require_owner, require_read
from shared.errors import Conflict, NotFound, ValidationFailed
from shared.infra.models import SavedUniverse, Symbol
from shared.library.scripts import page_by_name
from shared.marketdata import listings
from shared.marketdata.bars import SYMBOL_PATTERN
from shared.marketdata.resample import SERVED_TIMEFRAMES

# What a saved universe may be meant for: the stored timeframes, and the weekly and monthly ones resampled on read.
TIMEFRAMES: tuple[str, ...] = SERVED_TIMEFRAMES
DEFAULT_TIMEFRAME = "1d"


@dataclass(frozen=True)
class UniverseInput:
    name: str
    symbols: tuple[str, ...]
    description: str = ""
    timeframe: str = DEFAULT_TIMEFRAME


@dataclass(frozen=True)
class UniverseChanges:
    """Fields to change (None: keep)."""

    name: str | None = None
    symbols: tuple[str, ...] | None = None
    description: str | None = None
    timeframe: str | None = None
    expected_version: int | None = None


def normalise_symbols(raw: Sequence[object], *, max_symbols: int, field: str = "symbols") -> list[str]:
    """Upper-cased, pattern-checked, de-duplicated symbols (order kept); every bad one named ``field[i]``."""
    if not raw:
        raise ValidationFailed.for_field(field, "give at least one symbol")
    errors = []
    seen: dict[str, None] = {}
    for i, item in enumerate(raw):
        symbol = item.strip().upper() if isinstance(item, str) else None
        if symbol is None or not symbol.isascii() or SYMBOL_PATTERN.fullmatch(symbol) is None:
            shown = repr(item)[:40]
            errors.append({"field": f"{field}[{i}]", "message": f"invalid symbol {shown}: use letters, digits and "
                                                                 ". - ^ = _ (at most 32)"})  # fmt: skip
        else:
            seen.setdefault(symbol, None)
    if errors:
        raise ValidationFailed(f"{errors[0]['field']}: {errors[0]['message']}", details={"errors": errors})
    if len(seen) > max_symbols:
        raise ValidationFailed.for_field(field, f"{len(seen):,} symbols; at most {max_symbols:,}")
    return list(seen)


def check_timeframe(raw: object, *, field: str = "timeframe") -> str:
    """One of :data:`TIMEFRAMES`; anything else is a 422 naming ``field``."""
    if not isinstance(raw, str) or raw not in TIMEFRAMES:
        raise ValidationFailed.for_field(
            field, f"unknown timeframe {str(raw)[:20]!r}: use one of {', '.join(TIMEFRAMES)}"
        )
    return raw


def resolve_as_of(session: Session, universe_symbols: Sequence[str], day: dt.date) -> list[str]:
    """The members of a universe listed on ``day`` (listed on or before it, and not delisted before it), in the
    universe's order. A symbol without bars or a listing date is not listed on any day."""
    return listings.listed_as_of(session.connection(), day, universe_symbols)


def listed_members(session: Session, symbols: Sequence[object], day: dt.date, *, field: str = "as_of") -> list[str]:
    """``symbols`` (upper-cased) listed on ``day``, in order; none of them is a 422 naming ``field``."""
    wanted = [s.strip().upper() for s in symbols if isinstance(s, str)]
    listed = resolve_as_of(session, wanted, day)
    if not listed:
        raise ValidationFailed.for_field(field, f"none of the {len(wanted)} symbols was listed on {day}")
    return listed


def check_known(session: Session, symbols: Sequence[str], *, field: str = "symbols") -> None:
    """Every symbol must exist in ``symbols``; each unknown one is named ``field[i]``."""
    known = set(session.scalars(select(Symbol.symbol).where(Symbol.symbol.in_(list(symbols)))))
    unknown = [(i, s) for i, s in enumerate(symbols) if s not in known]
    if unknown:
        errors = [{"field": f"{field}[{i}]", "message": f"unknown symbol {s}"} for i, s in unknown]
        shown = ", ".join(s for _, s in unknown[:5]) + (f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else "")
        raise ValidationFailed(f"{field}: unknown symbol(s) {shown}", details={"errors": errors})


def _not_found(raw: object) -> NotFound:
    return NotFound(f"universe {str(raw)[:64]} not found", details={"universe_id": str(raw)[:64]})


def _parse_id(raw: str) -> uuid.UUID:
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise _not_found(raw) from None


def _flush_or_conflict(session: Session, name: str) -> None:
    try:
        with session.begin_nested():
            session.flush()
    except IntegrityError as exc:
        if "uq_universes_owner_name" in str(exc.orig):
            raise Conflict(f"you already have a universe named {name!r}", details={"field": "name"}) from None
        raise


def create_universe(session: Session, owner_id: str, fields: UniverseInput) -> SavedUniverse:
    check_known(session, fields.symbols)
    universe = SavedUniverse(
        owner_id=owner_id,
        name=fields.name,
        description=fields.description,
        symbols=list(fields.symbols),
        timeframe=check_timeframe(fields.timeframe),
        version=1,
    )
    session.add(universe)
    _flush_or_conflict(session, fields.name)
    session.refresh(universe)
    return universe


def get_universe(session: Session, principal: Principal, universe_id: str) -> SavedUniverse:
    """A universe the caller may read (owner or admin); anything else is a 404."""
    universe = session.get(SavedUniverse, _parse_id(universe_id))
    require_read(principal, universe.owner_id if universe else None, _not_found(universe_id))
    assert universe is not None
    return universe


def get_owned_universe(
    session: Session, principal: Principal, universe_id: str, *, for_update: bool = False
) -> SavedUniverse:
    """A universe the caller owns, optionally locked; a 404 otherwise (403 for an admin)."""
    universe = session.get(SavedUniverse, _parse_id(universe_id), with_for_update=for_update)
    require_owner(principal, universe.owner_id if universe else None, _not_found(universe_id))
    assert universe is not None
    return universe


def update_universe(session: Session, universe: SavedUniverse, changes: UniverseChanges) -> list[str]:
    """Apply changes to a locked universe; returns the changed fields (the version grows when any did)."""
    if changes.expected_version is not None and changes.expected_version != universe.version:
        raise Conflict(
            f"universe is at version {universe.version}, not {changes.expected_version}: it was changed meanwhile",
            details={"field": "expected_version", "version": universe.version},
        )
    changed: list[str] = []
    if changes.symbols is not None and list(changes.symbols) != list(universe.symbols):
        check_known(session, changes.symbols)
        universe.symbols = list(changes.symbols)
        changed.append("symbols")
    if changes.timeframe is not None and check_timeframe(changes.timeframe) != universe.timeframe:
        universe.timeframe = changes.timeframe
        changed.append("timeframe")
    for name in ("name", "description"):
        value = getattr(changes, name)
        if value is not None and value != getattr(universe, name):
            setattr(universe, name, value)
            changed.append(name)
    if changed:
        universe.version += 1
        universe.updated_at = session.scalar(select(func.now()))  # type: ignore[assignment]
        _flush_or_conflict(session, universe.name)
        session.refresh(universe)
    return changed


def delete_universe(session: Session, universe: SavedUniverse) -> None:
    """Runs made over it keep their symbols: the resolved list is part of each run's config."""
    session.delete(universe)
    session.flush()


def list_universes(
    session: Session, owner_id: str, *, limit: int, cursor: str | None = None, name_prefix: str | None = None
) -> tuple[list[SavedUniverse], str | None]:
    """One page of an owner's universes ordered by name, and the next page's cursor (None at the end)."""
    query = select(SavedUniverse).where(SavedUniverse.owner_id == owner_id)
    return page_by_name(session, SavedUniverse, query, limit=limit, cursor=cursor, name_prefix=name_prefix)


def find_for_run(session: Session, owner_id: str, reference: object, *, field: str = "universe") -> SavedUniverse:
    """The caller's universe named by id or by name. Anything else, someone else's universe included, is a 422
    naming ``field`` (the run's body refers to it; nothing of another user leaks)."""
    if not isinstance(reference, str) or not reference.strip() or len(reference) > 100:
        raise ValidationFailed.for_field(field, "give the id or the name of one of your saved universes")
    reference = reference.strip()
    universe = None
    with contextlib.suppress(ValueError):
        universe = session.get(SavedUniverse, uuid.UUID(reference))
    if universe is None or universe.owner_id != owner_id:
        universe = session.scalar(
            select(SavedUniverse).where(SavedUniverse.owner_id == owner_id, SavedUniverse.name == reference)
        )
    if universe is None:
        raise ValidationFailed.for_field(field, f"you have no saved universe with id or name {reference[:100]!r}")
    return universe
