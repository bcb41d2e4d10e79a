"""Presets: ``/api/presets[/<id>]``, a user's named backtest configs without symbols.

Creation is idempotent per name: the same name and config again answers 200 with the existing preset and
``Idempotent-Replayed: true`` (as runs do); the same name with another config is a 409 naming ``name``. A run
starts from one with ``POST /api/runs {"preset": "<id or name>", "symbols": [...], ...overrides}``
(``shared.library.presets.merge_overrides`` says how overrides merge). Someone else's preset is a 404.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

from flask import Response, jsonify
from flask_openapi3 import APIBlueprint, Tag
from pydantic import BaseModel, ConfigDict, Field

from api import BEARER_SECURITY, services
from api.account_schemas import MAX_PAGE, Name
from api.audit import audit
from api.auth import current_principal
from api.schemas import ErrorResponse
from shared.accounts.audit import AuditAction
from shared.errors import Forbidden, ValidationFailed
from shared.infra.db import session_scope
from shared.infra.models import Preset
from shared.library import presets

bp = APIBlueprint(
    "presets", __name__, url_prefix="/api/presets", abp_tags=[Tag(name="presets")], abp_security=BEARER_SECURITY
)

IDEMPOTENCY_HEADER = "Idempotent-Replayed"
_WRITE_ERRORS: dict[str | int, type[BaseModel] | dict[Any, Any] | None] = {
    400: ErrorResponse,
    403: ErrorResponse,
    404: ErrorResponse,
    409: ErrorResponse,
    413: ErrorResponse,
    422: ErrorResponse,
}
CONFIG_DESCRIPTION = (
    "the engine's backtest config (strategy, risk, execution, dates, cash...) without symbols; stored with every "
    "default spelled out"
)


class PresetCreateBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Annotated[Name, Field(max_length=100)]
    description: str = Field(default="", max_length=2000)
    config: dict[str, Any] = Field(description=CONFIG_DESCRIPTION)


class PresetUpdateBody(BaseModel):
    """Fields to change; omitted fields keep their value. A new config replaces the old one whole."""

    model_config = ConfigDict(extra="forbid")

    name: Annotated[Name, Field(max_length=100)] | None = None
    description: str | None = Field(default=None, max_length=2000)
    config: dict[str, Any] | None = Field(default=None, description=CONFIG_DESCRIPTION)
    expected_version: int | None = Field(
        default=None, ge=1, description="refuse (409) unless the preset is still at this version"
    )


class PresetPath(BaseModel):
    preset_id: str


class PresetListQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    limit: int = Field(default=50, ge=1, le=MAX_PAGE)
    cursor: str | None = Field(default=None, max_length=500)
    name_prefix: str | None = Field(default=None, min_length=1, max_length=100)
    owner_id: str | None = Field(default=None, max_length=64, description="admins: list this user's presets")


class PresetView(BaseModel):
    preset_id: str
    owner_id: str
    name: str
    description: str
    strategy: str
    config: dict[str, Any]
    config_hash: str
    version: int
    created_at: dt.datetime
    updated_at: dt.datetime
    url: str


class PresetPage(BaseModel):
    presets: list[PresetView]
    next_cursor: str | None


def preset_view(preset: Preset) -> PresetView:
    return PresetView(
        preset_id=str(preset.id),
        owner_id=preset.owner_id,
        name=preset.name,
        description=preset.description,
        strategy=str((preset.config.get("strategy") or {}).get("name", "")),
        config=preset.config,
        config_hash=preset.config_hash,
        version=preset.version,
        created_at=preset.created_at,
        updated_at=preset.updated_at,
        url=f"/api/presets/{preset.id}",
    )


@bp.post("", responses={200: PresetView, 201: PresetView, **_WRITE_ERRORS})
def create_preset(body: PresetCreateBody) -> Response:
    """Save a backtest config (without symbols) under a name. 201 for a new preset; 200 with
    ``Idempotent-Replayed: true`` when you already have this name with this config; 409 (``name``) when the name
    holds another config. Every config field is validated by the engine's schema (422 naming ``config.<field>``)."""
    principal = current_principal()
    config = presets.normalise_config(body.config)
    with session_scope(services().session_factory) as session:
        preset, created = presets.create_preset(session, principal.user_id, body.name, config, body.description)
        if created:
            audit(session, AuditAction.PRESET_CREATED, resource_type="preset", resource_id=preset.id,
                  name=preset.name, config_hash=preset.config_hash)  # fmt: skip
        view = preset_view(preset)
    response = jsonify(view.model_dump(mode="json"))
    response.status_code = 201 if created else 200
    response.headers["Location"] = view.url
    response.headers[IDEMPOTENCY_HEADER] = "false" if created else "true"
    return response


@bp.get("", responses={200: PresetPage, 403: ErrorResponse, 422: ErrorResponse})
def list_presets(query: PresetListQuery) -> Response:
    """Your presets ordered by name, paged with ``cursor``; filter by ``name_prefix``."""
    principal = current_principal()
    owner_id = principal.user_id
    if query.owner_id and query.owner_id != principal.user_id:
        if not principal.is_admin:
            raise Forbidden("only admins may list other users' presets")
        owner_id = query.owner_id
    with services().session_factory() as session:
        rows, next_cursor = presets.list_presets(
            session, owner_id, limit=query.limit, cursor=query.cursor, name_prefix=query.name_prefix
        )
        page = PresetPage(presets=[preset_view(p) for p in rows], next_cursor=next_cursor)
    return jsonify(page.model_dump(mode="json"))


@bp.get("/<preset_id>", responses={200: PresetView, 404: ErrorResponse})
def get_preset(path: PresetPath) -> Response:
    """One preset with its full config."""
    with services().session_factory() as session:
        preset = presets.get_preset(session, current_principal(), path.preset_id)
        return jsonify(preset_view(preset).model_dump(mode="json"))


@bp.put("/<preset_id>", responses={200: PresetView, **_WRITE_ERRORS})
def update_preset(path: PresetPath, body: PresetUpdateBody) -> Response:
    """Change a preset; omitted fields keep their value. Runs started from it earlier keep their config."""
    principal = current_principal()
    if body.name is None and body.description is None and body.config is None:
        raise ValidationFailed.for_field("body", "nothing to change: give at least one of name, description, config")
    changes = presets.PresetChanges(
        name=body.name,
        description=body.description,
        config=presets.normalise_config(body.config) if body.config is not None else None,
        expected_version=body.expected_version,
    )
    with session_scope(services().session_factory) as session:
        preset = presets.get_owned_preset(session, principal, path.preset_id, for_update=True)
        changed = presets.update_preset(session, preset, changes)
        if changed:
            audit(session, AuditAction.PRESET_UPDATED, resource_type="preset", resource_id=preset.id,
                  changed=changed, version=preset.version)  # fmt: skip
        view = preset_view(preset)
    return jsonify(view.model_dump(mode="json"))


@bp.delete("/<preset_id>", responses={204: None, 403: ErrorResponse, 404: ErrorResponse})
def delete_preset(path: PresetPath) -> Response:
    """Delete a preset. Runs started from it keep their full config."""
    principal = current_principal()
    with session_scope(services().session_factory) as session:
        preset = presets.get_owned_preset(session, principal, path.preset_id, for_update=True)
        audit(session, AuditAction.PRESET_DELETED, resource_type="preset", resource_id=preset.id, name=preset.name)
        presets.delete_preset(session, preset)
    return Response(status=204)
