"""Saved scripts (calculations and strategies): CRUD with numbered versions of the code.

A script's code is compiled under the sandbox policy whenever it is saved, so a saved script always compiled
when it was saved. Every code change adds a row to ``script_versions`` (version 1 is the first text); the
script row holds the current text and number. Jobs copy the exact text of the version they run and record its
number, so their results stay explainable after later edits and after the script is deleted.

A script's ``kind`` is fixed when it is created: ``calculation`` (assigns ``result``) or ``strategy`` (assigns
signals, ``shared.library.strategy_scripts``). A strategy declares its ``parameters``; they belong to the version (a
change of the declarations, like a change of code, adds a version), so a run pinned to a version validates its
parameters against that version's declarations. A strategy is never a nightly recalculation.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import uuid
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import Select, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from shared.accounts.access import Principal, require_owner, require_read
from shared.domain.sandbox.policy import compile_script
from shared.errors import Conflict, NotFound, ScriptCompileError, ValidationFailed
from shared.infra import pagination
from shared.infra.models import Preset, SavedUniverse, Script, ScriptVersion
from shared.library.strategy_scripts import KIND_CALCULATION, KIND_STRATEGY, check_declarations

MAX_NAME_CHARS = 100
MAX_DESCRIPTION_CHARS = 2_000


@dataclass(frozen=True)
class ScriptInput:
    """Validated fields of a new script."""

    name: str
    code: str
    description: str = ""
    nightly: bool = False
    universe: tuple[str, ...] = ()
    kind: str = KIND_CALCULATION
    parameters: dict[str, Any] | None = None  # a strategy's declarations (name -> type, default, bounds)


@dataclass(frozen=True)
class ScriptChanges:
    """Fields to change (None: keep). ``expected_version`` guards against overwriting someone else's edit."""

    name: str | None = None
    code: str | None = None
    description: str | None = None
    nightly: bool | None = None
    universe: tuple[str, ...] | None = None
    expected_version: int | None = None
    parameters: dict[str, Any] | None = None


def sha256_text(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8")).hexdigest()


def check_code(code: str, *, max_chars: int) -> None:
    """Length first (compiling is not free), then the sandbox's compile policy; errors name the field ``code``."""
    if len(code) > max_chars:
        raise ValidationFailed.for_field("code", f"code is {len(code):,} characters; at most {max_chars:,} allowed")
    try:
        compile_script(code)
    except ScriptCompileError as exc:
        raise ScriptCompileError(exc.reason, line=exc.line, field="code") from None


def _check_nightly(nightly: bool, universe: tuple[str, ...] | list[str], kind: str = KIND_CALCULATION) -> None:
    if nightly and kind == KIND_STRATEGY:
        raise ValidationFailed.for_field("nightly", "a strategy script is backtested, not recalculated nightly")
    if nightly and not universe:
        raise ValidationFailed.for_field("universe", "a script flagged for nightly recalculation needs symbols")


def _not_found(script_id: object) -> NotFound:
    return NotFound(f"script {str(script_id)[:64]} not found", details={"script_id": str(script_id)[:64]})


def parse_script_id(raw: str) -> uuid.UUID:
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise _not_found(raw) from None


def _flush_or_conflict(session: Session, name: str) -> None:
    try:
        with session.begin_nested():
            session.flush()
    except IntegrityError as exc:
        if "uq_scripts_owner_name" in str(exc.orig):
            raise Conflict(f"you already have a script named {name!r}", details={"field": "name"}) from None
        raise


def create_script(session: Session, owner_id: str, fields: ScriptInput, *, max_chars: int) -> Script:
    check_code(fields.code, max_chars=max_chars)
    if fields.kind not in (KIND_CALCULATION, KIND_STRATEGY):
        raise ValidationFailed.for_field("kind", f"must be {KIND_CALCULATION!r} or {KIND_STRATEGY!r}")
    if fields.kind == KIND_CALCULATION and fields.parameters:
        raise ValidationFailed.for_field("parameters", "only a strategy script declares parameters")
    parameters = check_declarations(fields.parameters)
    _check_nightly(fields.nightly, fields.universe, fields.kind)
    script = Script(
        owner_id=owner_id,
        name=fields.name,
        description=fields.description,
        code=fields.code,
        version=1,
        nightly=fields.nightly,
        universe=list(fields.universe),
        kind=fields.kind,
        parameters=parameters,
    )
    session.add(script)
    _flush_or_conflict(session, fields.name)
    session.add(ScriptVersion(script_id=script.id, version=1, code=fields.code, code_sha256=sha256_text(fields.code),
                              parameters=parameters))  # fmt: skip
    session.flush()
    session.refresh(script)
    return script


def get_script(session: Session, principal: Principal, script_id: str) -> Script:
    """A script the caller may read (owner or admin); anything else is 404."""
    parsed = parse_script_id(script_id)
    script = session.get(Script, parsed)
    require_read(principal, script.owner_id if script else None, _not_found(script_id))
    assert script is not None
    return script


def get_owned_script(session: Session, principal: Principal, script_id: str, *, for_update: bool = False) -> Script:
    """A script the caller owns, optionally locked for an update; 404 otherwise (403 for an admin)."""
    parsed = parse_script_id(script_id)
    script = session.get(Script, parsed, with_for_update=for_update)
    require_owner(principal, script.owner_id if script else None, _not_found(script_id))
    assert script is not None
    return script


def update_script(session: Session, script: Script, changes: ScriptChanges, *, max_chars: int) -> list[str]:
    """Apply changes to a locked script; a new code text becomes the next version. Returns the changed fields."""
    if changes.expected_version is not None and changes.expected_version != script.version:
        raise Conflict(
            f"script is at version {script.version}, not {changes.expected_version}: it was changed meanwhile",
            details={"field": "expected_version", "version": script.version},
        )
    changed: list[str] = []
    parameters = script.parameters
    if changes.parameters is not None:
        if script.kind != KIND_STRATEGY:
            raise ValidationFailed.for_field("parameters", "only a strategy script declares parameters")
        parameters = check_declarations(changes.parameters)
    code_changed = changes.code is not None and changes.code != script.code
    if code_changed or parameters != script.parameters:
        code = changes.code if changes.code is not None else script.code
        if code_changed:
            check_code(code, max_chars=max_chars)
            changed.append("code")
        if parameters != script.parameters:
            changed.append("parameters")
        script.code = code
        script.parameters = parameters
        script.version += 1
        session.add(
            ScriptVersion(
                script_id=script.id, version=script.version, code=code, code_sha256=sha256_text(code),
                parameters=parameters,
            )
        )  # fmt: skip
    for name in ("name", "description", "nightly"):
        value = getattr(changes, name)
        if value is not None and value != getattr(script, name):
            setattr(script, name, value)
            changed.append(name)
    if changes.universe is not None and list(changes.universe) != list(script.universe):
        script.universe = list(changes.universe)
        changed.append("universe")
    _check_nightly(script.nightly, script.universe, script.kind)
    if changed:
        script.updated_at = session.scalar(select(func.now()))  # type: ignore[assignment]
        _flush_or_conflict(session, script.name)
        session.refresh(script)
    return changed


def delete_script(session: Session, script: Script) -> None:
    """Delete the script and its versions. Jobs that ran it keep their text, version number and results."""
    session.delete(script)
    session.flush()


# --- listing ------------------------------------------------------------------------------------------------


_NamedT = TypeVar("_NamedT", Script, Preset, SavedUniverse)


def page_by_name(
    session: Session,
    model: type[_NamedT],
    query: Select[tuple[_NamedT]],
    *,
    limit: int,
    cursor: str | None,
    name_prefix: str | None,
) -> tuple[list[_NamedT], str | None]:
    """One page of ``query`` (an owner's scripts, presets or universes) ordered by name then id, keyset-paged, and
    the next page's cursor (None at the end); ``name_prefix`` filters by a literal prefix."""
    if name_prefix:
        escaped = name_prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        query = query.where(model.name.like(escaped + "%", escape="\\"))
    keyset: pagination.Keyset[_NamedT] = pagination.Keyset(
        (model.name, model.id), (pagination.text, pagination.uuid_value), lambda row: (row.name, row.id)
    )
    return pagination.page(session, query, keyset, limit=limit, cursor=cursor)


def list_scripts(
    session: Session,
    owner_id: str,
    *,
    limit: int,
    cursor: str | None = None,
    name_prefix: str | None = None,
    updated_since: dt.datetime | None = None,
) -> tuple[list[Script], str | None]:
    """One page of an owner's scripts ordered by name, and the cursor of the next page (None at the end)."""
    query = select(Script).where(Script.owner_id == owner_id)
    if updated_since is not None:
        query = query.where(Script.updated_at >= updated_since)
    return page_by_name(session, Script, query, limit=limit, cursor=cursor, name_prefix=name_prefix)


VERSIONS_NEWEST_FIRST: pagination.Keyset[ScriptVersion] = pagination.Keyset(
    (ScriptVersion.version,), (pagination.integer,), lambda v: (v.version,), descending=True
)


def list_versions(
    session: Session, script: Script, *, limit: int, cursor: str | None = None
) -> tuple[list[ScriptVersion], str | None]:
    """Versions newest first."""
    query = select(ScriptVersion).where(ScriptVersion.script_id == script.id)
    return pagination.page(session, query, VERSIONS_NEWEST_FIRST, limit=limit, cursor=cursor)


def get_version(session: Session, script: Script, version: int) -> ScriptVersion:
    row = session.get(ScriptVersion, (script.id, version))
    if row is None:
        raise NotFound(
            f"script {script.id} has no version {version} (latest is {script.version})",
            details={"script_id": str(script.id), "version": version},
        )
    return row
