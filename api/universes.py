"""Saved universes: ``/api/universes[/<id>]``, a user's named lists of symbols.

Owners read and change theirs; admins may read anyone's. Someone else's universe is a 404. A run is created over
one with ``POST /api/runs {"universe": "<id or name>", ...}``. ``GET /api/universes/<id>?as_of=YYYY-MM-DD`` gives
the universe as of that day: only its symbols listed then (delisted ones included before their delisting).
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal

from flask import Response, jsonify
from flask_openapi3 import APIBlueprint, Tag
from pydantic import BaseModel, ConfigDict, Field

from api import BEARER_SECURITY, services
from api.account_schemas import MAX_PAGE, Name
from api.audit import audit
from api.auth import current_principal
from api.schemas import ErrorResponse, IsoDate
from shared.accounts.audit import AuditAction
from shared.errors import Forbidden, ValidationFailed
from shared.infra.db import session_scope
from shared.infra.models import SavedUniverse
from shared.library import universes

bp = APIBlueprint(
    "universes", __name__, url_prefix="/api/universes", abp_tags=[Tag(name="universes")], abp_security=BEARER_SECURITY
)

_WRITE_ERRORS: dict[str | int, type[BaseModel] | dict[Any, Any] | None] = {
    400: ErrorResponse,
    403: ErrorResponse,
    404: ErrorResponse,
    409: ErrorResponse,
    413: ErrorResponse,
    422: ErrorResponse,
}
Symbols = Annotated[
    list[str], Field(min_length=1, description="symbols, upper-cased; duplicates are removed, order kept")
]
Timeframe = Literal["1m", "5m", "15m", "30m", "1h", "1d", "1w", "1mo"]  # universes.TIMEFRAMES


class UniverseCreateBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Annotated[Name, Field(max_length=100)]
    description: str = Field(default="", max_length=2000)
    symbols: Symbols
    timeframe: Timeframe = Field(default="1d", description="the timeframe the universe is meant for")


class UniverseUpdateBody(BaseModel):
    """Fields to change; omitted fields keep their value."""

    model_config = ConfigDict(extra="forbid")

    name: Annotated[Name, Field(max_length=100)] | None = None
    description: str | None = Field(default=None, max_length=2000)
    symbols: Symbols | None = None
    timeframe: Timeframe | None = None
    expected_version: int | None = Field(
        default=None, ge=1, description="refuse (409) unless the universe is still at this version"
    )


class UniversePath(BaseModel):
    universe_id: str


class UniverseGetQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    as_of: IsoDate | None = Field(
        default=None, description="only the symbols listed on this day (YYYY-MM-DD): listed by then, not delisted yet"
    )


class UniverseListQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    limit: int = Field(default=50, ge=1, le=MAX_PAGE)
    cursor: str | None = Field(default=None, max_length=500)
    name_prefix: str | None = Field(default=None, min_length=1, max_length=100)
    owner_id: str | None = Field(default=None, max_length=64, description="admins: list this user's universes")


class UniverseView(BaseModel):
    universe_id: str
    owner_id: str
    name: str
    description: str
    symbols: list[str]
    timeframe: str
    as_of: dt.date | None = Field(default=None, description="the day ``symbols`` were taken as of (None: all of them)")
    version: int
    created_at: dt.datetime
    updated_at: dt.datetime
    url: str


class UniverseSummary(BaseModel):
    universe_id: str
    owner_id: str
    name: str
    description: str
    size: int
    timeframe: str
    version: int
    created_at: dt.datetime
    updated_at: dt.datetime
    url: str


class UniversePage(BaseModel):
    universes: list[UniverseSummary]
    next_cursor: str | None


def _url(universe: SavedUniverse) -> str:
    return f"/api/universes/{universe.id}"


def universe_view(universe: SavedUniverse) -> UniverseView:
    return UniverseView(
        universe_id=str(universe.id),
        owner_id=universe.owner_id,
        name=universe.name,
        description=universe.description,
        symbols=list(universe.symbols),
        timeframe=universe.timeframe,
        version=universe.version,
        created_at=universe.created_at,
        updated_at=universe.updated_at,
        url=_url(universe),
    )


def _symbols(raw: list[str]) -> tuple[str, ...]:
    return tuple(universes.normalise_symbols(raw, max_symbols=services().settings.max_symbols_per_job))


@bp.post("", responses={201: UniverseView, **_WRITE_ERRORS})
def create_universe(body: UniverseCreateBody) -> Response:
    """Save a list of symbols under a name of yours (unique per user: a taken name is a 409 naming ``name``).
    Every symbol must be known: an unknown one is a 422 naming ``symbols[i]``."""
    principal = current_principal()
    fields = universes.UniverseInput(
        name=body.name, description=body.description, symbols=_symbols(body.symbols), timeframe=body.timeframe
    )
    with session_scope(services().session_factory) as session:
        universe = universes.create_universe(session, principal.user_id, fields)
        audit(session, AuditAction.UNIVERSE_CREATED, resource_type="universe", resource_id=universe.id,
              name=universe.name, symbols=len(universe.symbols))  # fmt: skip
        view = universe_view(universe)
    response = jsonify(view.model_dump(mode="json"))
    response.status_code = 201
    response.headers["Location"] = view.url
    return response


@bp.get("", responses={200: UniversePage, 403: ErrorResponse, 422: ErrorResponse})
def list_universes(query: UniverseListQuery) -> Response:
    """Your universes ordered by name, paged with ``cursor``; filter by ``name_prefix``."""
    principal = current_principal()
    owner_id = principal.user_id
    if query.owner_id and query.owner_id != principal.user_id:
        if not principal.is_admin:
            raise Forbidden("only admins may list other users' universes")
        owner_id = query.owner_id
    with services().session_factory() as session:
        rows, next_cursor = universes.list_universes(
            session, owner_id, limit=query.limit, cursor=query.cursor, name_prefix=query.name_prefix
        )
        page = UniversePage(
            universes=[
                UniverseSummary(
                    universe_id=str(u.id),
                    owner_id=u.owner_id,
                    name=u.name,
                    description=u.description,
                    size=len(u.symbols),
                    timeframe=u.timeframe,
                    version=u.version,
                    created_at=u.created_at,
                    updated_at=u.updated_at,
                    url=_url(u),
                )
                for u in rows
            ],
            next_cursor=next_cursor,
        )
    return jsonify(page.model_dump(mode="json"))


@bp.get("/<universe_id>", responses={200: UniverseView, 404: ErrorResponse, 422: ErrorResponse})
def get_universe(path: UniversePath, query: UniverseGetQuery) -> Response:
    """One universe with its symbols; with ``as_of``, only those listed on that day (in the universe's order)."""
    with services().session_factory() as session:
        universe = universes.get_universe(session, current_principal(), path.universe_id)
        view = universe_view(universe)
        if query.as_of is not None:
            listed = universes.resolve_as_of(session, universe.symbols, query.as_of)
            view = view.model_copy(update={"symbols": listed, "as_of": query.as_of})
        return jsonify(view.model_dump(mode="json"))


@bp.put("/<universe_id>", responses={200: UniverseView, **_WRITE_ERRORS})
def update_universe(path: UniversePath, body: UniverseUpdateBody) -> Response:
    """Change a universe; omitted fields keep their value. Runs made over it earlier keep their symbols."""
    principal = current_principal()
    if body.name is None and body.description is None and body.symbols is None and body.timeframe is None:
        raise ValidationFailed.for_field(
            "body", "nothing to change: give at least one of name, description, symbols, timeframe"
        )
    changes = universes.UniverseChanges(
        name=body.name,
        description=body.description,
        symbols=_symbols(body.symbols) if body.symbols is not None else None,
        timeframe=body.timeframe,
        expected_version=body.expected_version,
    )
    with session_scope(services().session_factory) as session:
        universe = universes.get_owned_universe(session, principal, path.universe_id, for_update=True)
        changed = universes.update_universe(session, universe, changes)
        if changed:
            audit(session, AuditAction.UNIVERSE_UPDATED, resource_type="universe", resource_id=universe.id,
                  changed=changed, version=universe.version)  # fmt: skip
        view = universe_view(universe)
    return jsonify(view.model_dump(mode="json"))


@bp.delete("/<universe_id>", responses={204: None, 403: ErrorResponse, 404: ErrorResponse})
def delete_universe(path: UniversePath) -> Response:
    """Delete a universe. Runs made over it keep their symbols (they are part of each run's config)."""
    principal = current_principal()
    with session_scope(services().session_factory) as session:
        universe = universes.get_owned_universe(session, principal, path.universe_id, for_update=True)
        audit(session, AuditAction.UNIVERSE_DELETED, resource_type="universe", resource_id=universe.id,
              name=universe.name)  # fmt: skip
        universes.delete_universe(session, universe)
    return Response(status=204)
