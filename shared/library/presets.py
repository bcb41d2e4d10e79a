"""Presets: a user's named backtest config without symbols, CRUD, and the merge that starts a run from one.

A preset holds everything of the engine's config (``shared.domain.backtest.BacktestConfig``) except the symbols, which
a run gives (``symbols``, ``symbol`` or ``universe``): one preset, many universes. The config is validated by
``BacktestConfig`` itself (with a placeholder symbol) and stored with every default spelled out, so two configs
that mean the same run are equal; ``config_hash`` is the SHA-256 of its canonical JSON.

Creation is idempotent per (owner, name): the same name with the same config finds the existing preset; the same
name with another config is a 409 naming ``name``.

A run from a preset: the run's body minus ``preset`` (and the symbols) is laid over the preset's config by
``merge_overrides``: objects merge key by key, anything else (numbers, strings, dates, lists) replaces the preset's
value, and an object that names a different ``name`` (strategy) or ``model`` (risk) replaces the preset's object
whole, since the other one's parameters would not fit it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pydantic
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from shared.accounts.access import Principal, require_owner, require_read
from shared.domain.backtest import BacktestConfig
from shared.errors import Conflict, NotFound, ValidationFailed
from shared.infra.models import Preset
from shared.library.scripts import page_by_name

PLACEHOLDER_SYMBOL = "PRESET"
"""Stands in for the symbols while ``BacktestConfig`` validates a preset; never stored."""
SYMBOL_KEYS = ("symbols", "symbol", "universe")
REPLACING_KEYS = ("name", "model")
"""An override object naming another strategy (``name``) or risk model (``model``) replaces the preset's whole."""


@dataclass(frozen=True)
class PresetChanges:
    name: str | None = None
    description: str | None = None
    config: dict[str, Any] | None = None
    expected_version: int | None = None


def _field_path(prefix: str, loc: Sequence[int | str]) -> str:
    path = prefix
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "body"


def validation_failed(exc: pydantic.ValidationError, prefix: str) -> ValidationFailed:
    """Pydantic's errors as our 422, each field named under ``prefix`` (``config.strategy.params.fast``)."""
    errors = []
    for err in exc.errors(include_url=False, include_input=False, include_context=False):
        message = str(err["msg"]).removeprefix("Value error, ")
        errors.append({"field": _field_path(prefix, err["loc"]), "message": message, "type": err["type"]})
    summary = "; ".join(f"{e['field']}: {e['message']}" for e in errors[:3])
    if len(errors) > 3:
        summary += f" (and {len(errors) - 3} more)"
    return ValidationFailed(summary, details={"errors": errors})


def normalise_config(raw: object, *, field: str = "config") -> dict[str, Any]:
    """The preset's config validated by the engine's schema, defaults spelled out, without symbols."""
    if not isinstance(raw, dict):
        raise ValidationFailed.for_field(field, "must be a JSON object with a backtest config (without symbols)")
    for key in SYMBOL_KEYS:
        if key in raw:
            raise ValidationFailed.for_field(
                f"{field}.{key}", "a preset holds no symbols: give them when you start a run from it"
            )
    try:
        config = BacktestConfig.model_validate({**raw, "symbols": [PLACEHOLDER_SYMBOL]})
    except pydantic.ValidationError as exc:
        raise validation_failed(exc, field) from None
    dumped = config.model_dump(mode="json")
    del dumped["symbols"]
    return dumped


def config_hash(config: Mapping[str, Any]) -> str:
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def merge_overrides(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``overrides`` laid over ``base`` (see the module's docstring for the rules)."""
    merged = dict(base)
    for key, value in overrides.items():
        current = merged.get(key)
        if isinstance(value, dict) and isinstance(current, dict):
            replaced = any(k in value and value[k] != current.get(k) for k in REPLACING_KEYS)
            merged[key] = dict(value) if replaced else merge_overrides(current, value)
        else:
            merged[key] = value
    return merged


# --- CRUD -------------------------------------------------------------------------------------------------------


def _not_found(raw: object) -> NotFound:
    return NotFound(f"preset {str(raw)[:64]} not found", details={"preset_id": str(raw)[:64]})


def _parse_id(raw: str) -> uuid.UUID:
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise _not_found(raw) from None


def _name_taken(name: str) -> Conflict:
    return Conflict(
        f"you already have a preset named {name!r} with another config", details={"field": "name", "name": name}
    )


def _find_by_name(session: Session, owner_id: str, name: str) -> Preset | None:
    return session.scalar(select(Preset).where(Preset.owner_id == owner_id, Preset.name == name))


def create_preset(
    session: Session, owner_id: str, name: str, config: dict[str, Any], description: str = ""
) -> tuple[Preset, bool]:
    """(preset, created). The same name and config again: the existing preset, created False."""
    digest = config_hash(config)
    existing = _find_by_name(session, owner_id, name)
    if existing is None:
        preset = Preset(
            owner_id=owner_id, name=name, description=description, config=config, config_hash=digest, version=1
        )
        session.add(preset)
        try:
            with session.begin_nested():
                session.flush()
        except IntegrityError as exc:  # a concurrent create of the same name won: judge against it
            if "uq_presets_owner_name" not in str(exc.orig):
                raise
            existing = _find_by_name(session, owner_id, name)
            if existing is None:
                raise
        else:
            session.refresh(preset)
            return preset, True
    if existing.config_hash != digest:
        raise _name_taken(name)
    return existing, False


def get_preset(session: Session, principal: Principal, preset_id: str) -> Preset:
    """A preset the caller may read (owner or admin); anything else is a 404."""
    preset = session.get(Preset, _parse_id(preset_id))
    require_read(principal, preset.owner_id if preset else None, _not_found(preset_id))
    assert preset is not None
    return preset


def get_owned_preset(session: Session, principal: Principal, preset_id: str, *, for_update: bool = False) -> Preset:
    preset = session.get(Preset, _parse_id(preset_id), with_for_update=for_update)
    require_owner(principal, preset.owner_id if preset else None, _not_found(preset_id))
    assert preset is not None
    return preset


def update_preset(session: Session, preset: Preset, changes: PresetChanges) -> list[str]:
    """Apply changes to a locked preset; returns the changed fields (the version grows when any did)."""
    if changes.expected_version is not None and changes.expected_version != preset.version:
        raise Conflict(
            f"preset is at version {preset.version}, not {changes.expected_version}: it was changed meanwhile",
            details={"field": "expected_version", "version": preset.version},
        )
    changed: list[str] = []
    if changes.config is not None and config_hash(changes.config) != preset.config_hash:
        preset.config = changes.config
        preset.config_hash = config_hash(changes.config)
        changed.append("config")
    for name in ("name", "description"):
        value = getattr(changes, name)
        if value is not None and value != getattr(preset, name):
            setattr(preset, name, value)
            changed.append(name)
    if changed:
        preset.version += 1
        preset.updated_at = session.scalar(select(func.now()))  # type: ignore[assignment]
        try:
            with session.begin_nested():
                session.flush()
        except IntegrityError as exc:
            if "uq_presets_owner_name" in str(exc.orig):
                raise Conflict(f"you already have a preset named {preset.name!r}", details={"field": "name"}) from None
            raise
        session.refresh(preset)
    return changed


def delete_preset(session: Session, preset: Preset) -> None:
    """Runs started from it keep their full config."""
    session.delete(preset)
    session.flush()


def list_presets(
    session: Session, owner_id: str, *, limit: int, cursor: str | None = None, name_prefix: str | None = None
) -> tuple[list[Preset], str | None]:
    """One page of an owner's presets ordered by name, and the next page's cursor (None at the end)."""
    query = select(Preset).where(Preset.owner_id == owner_id)
    return page_by_name(session, Preset, query, limit=limit, cursor=cursor, name_prefix=name_prefix)


def resolve_for_run(session: Session, owner_id: str, reference: object, *, field: str = "preset") -> dict[str, Any]:
    """The config of the caller's preset named by id or by name; anything else (someone else's too) is a 422
    naming ``field``."""
    if not isinstance(reference, str) or not reference.strip() or len(reference) > 100:
        raise ValidationFailed.for_field(field, "give the id or the name of one of your presets")
    reference = reference.strip()
    preset = None
    with contextlib.suppress(ValueError):
        preset = session.get(Preset, uuid.UUID(reference))
    if preset is None or preset.owner_id != owner_id:
        preset = _find_by_name(session, owner_id, reference)
    if preset is None:
        raise ValidationFailed.for_field(field, f"you have no preset with id or name {reference[:100]!r}")
    return dict(preset.config)
