"""Saved scripts: ``/api/custom-calculations/scripts[/<id>[/versions[/<n>]]]``.

Owners read and change their scripts; admins may read anyone's. Someone else's script is a 404.
"""

from __future__ import annotations

from typing import Any

from flask import Response, jsonify
from flask_openapi3 import APIBlueprint, Tag
from pydantic import BaseModel

from api import BEARER_SECURITY, services
from api.account_schemas import (
    ScriptCreateBody,
    ScriptLinks,
    ScriptListQuery,
    ScriptPage,
    ScriptPath,
    ScriptSummary,
    ScriptUpdateBody,
    ScriptVersionPage,
    ScriptVersionPath,
    ScriptVersionView,
    VersionListQuery,
)
from api.account_schemas import ScriptView as ScriptViewSchema
from api.audit import audit
from api.auth import current_principal
from api.schemas import ErrorResponse
from shared.accounts.audit import AuditAction
from shared.errors import Forbidden, ScriptCompileError, ValidationFailed
from shared.infra import security
from shared.infra.db import session_scope
from shared.infra.models import Script, ScriptVersion
from shared.library import scripts

bp = APIBlueprint(
    "scripts",
    __name__,
    url_prefix="/api/custom-calculations/scripts",
    abp_tags=[Tag(name="scripts")],
    abp_security=BEARER_SECURITY,
)

_WRITE_ERRORS: dict[str | int, type[BaseModel] | dict[Any, Any] | None] = {
    400: ErrorResponse,
    403: ErrorResponse,
    404: ErrorResponse,
    409: ErrorResponse,
    413: ErrorResponse,
    422: ErrorResponse,
}


def script_links(script: Script) -> ScriptLinks:
    base = f"/api/custom-calculations/scripts/{script.id}"
    return ScriptLinks(self=base, versions=f"{base}/versions")


def script_view(script: Script) -> ScriptViewSchema:
    return ScriptViewSchema(
        script_id=str(script.id),
        owner_id=script.owner_id,
        name=script.name,
        description=script.description,
        code=script.code,
        version=script.version,
        nightly=script.nightly,
        universe=list(script.universe),
        kind=script.kind,
        parameters=script.parameters,
        created_at=script.created_at,
        updated_at=script.updated_at,
        links=script_links(script),
    )


def _version_view(row: ScriptVersion) -> ScriptVersionView:
    return ScriptVersionView(
        script_id=str(row.script_id),
        version=row.version,
        code=row.code,
        code_sha256=row.code_sha256,
        parameters=row.parameters,
        created_at=row.created_at,
    )


def _check_universe_size(universe: list[str] | None) -> None:
    limit = services().settings.max_symbols_per_job
    if universe is not None and len(universe) > limit:
        raise ValidationFailed.for_field("universe", f"{len(universe):,} symbols; at most {limit:,}")


@bp.post("", responses={201: ScriptViewSchema, **_WRITE_ERRORS})
def create_script(body: ScriptCreateBody) -> Response:
    """Save a script (compiled under the sandbox policy first: a syntax or policy error is a 422 with the line)."""
    principal = current_principal()
    svc = services()
    _check_universe_size(body.universe)
    fields = scripts.ScriptInput(
        name=body.name,
        code=body.code,
        description=body.description,
        nightly=body.nightly,
        universe=tuple(body.universe),
        kind=body.kind,
        parameters=body.parameters,
    )
    try:
        with session_scope(svc.session_factory) as session:
            script = scripts.create_script(session, principal.user_id, fields, max_chars=svc.settings.max_script_chars)
            audit(session, AuditAction.SCRIPT_CREATED, resource_type="script", resource_id=script.id,
                  name=script.name, version=script.version)  # fmt: skip
            view = script_view(script)
    except ScriptCompileError as exc:  # the save is rolled back; the refusal is kept on record
        security.record_compile_refusal(svc.session_factory, exc, owner_id=principal.user_id)
        raise
    response = jsonify(view.model_dump(mode="json"))
    response.status_code = 201
    response.headers["Location"] = view.links.self
    return response


@bp.get("", responses={200: ScriptPage, 403: ErrorResponse, 422: ErrorResponse})
def list_scripts(query: ScriptListQuery) -> Response:
    """Your scripts ordered by name, paged with ``cursor``; filter by ``name_prefix`` and ``updated_since``."""
    principal = current_principal()
    owner_id = principal.user_id
    if query.owner_id and query.owner_id != principal.user_id:
        if not principal.is_admin:
            raise Forbidden("only admins may list other users' scripts")
        owner_id = query.owner_id
    if query.updated_since is not None and query.updated_since.tzinfo is None:
        raise ValidationFailed.for_field("updated_since", "give a time zone, e.g. 2026-01-31T00:00:00Z")
    with services().session_factory() as session:
        rows, next_cursor = scripts.list_scripts(
            session,
            owner_id,
            limit=query.limit,
            cursor=query.cursor,
            name_prefix=query.name_prefix,
            updated_since=query.updated_since,
        )
        page = ScriptPage(
            scripts=[
                ScriptSummary(
                    script_id=str(s.id),
                    owner_id=s.owner_id,
                    name=s.name,
                    description=s.description,
                    version=s.version,
                    nightly=s.nightly,
                    universe_size=len(s.universe),
                    kind=s.kind,
                    created_at=s.created_at,
                    updated_at=s.updated_at,
                )
                for s in rows
            ],
            next_cursor=next_cursor,
        )
    return jsonify(page.model_dump(mode="json"))


@bp.get("/<script_id>", responses={200: ScriptViewSchema, 404: ErrorResponse})
def get_script(path: ScriptPath) -> Response:
    """One script with its current code and version."""
    with services().session_factory() as session:
        script = scripts.get_script(session, current_principal(), path.script_id)
        return jsonify(script_view(script).model_dump(mode="json"))


@bp.put("/<script_id>", responses={200: ScriptViewSchema, **_WRITE_ERRORS})
def update_script(path: ScriptPath, body: ScriptUpdateBody) -> Response:
    """Change a script; omitted fields keep their value. New code is compiled first and becomes the next
    version (the previous text stays readable under ``/versions``)."""
    principal = current_principal()
    svc = services()
    _check_universe_size(body.universe)
    changes = scripts.ScriptChanges(
        name=body.name,
        code=body.code,
        description=body.description,
        nightly=body.nightly,
        universe=tuple(body.universe) if body.universe is not None else None,
        expected_version=body.expected_version,
        parameters=body.parameters,
    )
    if all(getattr(changes, f) is None for f in ("name", "code", "description", "nightly", "universe", "parameters")):
        raise ValidationFailed.for_field("body", "nothing to change: give at least one of name, description, "
                                         "code, nightly, universe, parameters")  # fmt: skip
    try:
        with session_scope(svc.session_factory) as session:
            script = scripts.get_owned_script(session, principal, path.script_id, for_update=True)
            changed = scripts.update_script(session, script, changes, max_chars=svc.settings.max_script_chars)
            if changed:
                audit(session, AuditAction.SCRIPT_UPDATED, resource_type="script", resource_id=script.id,
                      changed=changed, version=script.version)  # fmt: skip
            view = script_view(script)
    except ScriptCompileError as exc:
        security.record_compile_refusal(svc.session_factory, exc, owner_id=principal.user_id)
        raise
    return jsonify(view.model_dump(mode="json"))


@bp.delete("/<script_id>", responses={204: None, 403: ErrorResponse, 404: ErrorResponse})
def delete_script(path: ScriptPath) -> Response:
    """Delete a script and its versions. Jobs that ran it keep their results and the exact text they ran."""
    principal = current_principal()
    with session_scope(services().session_factory) as session:
        script = scripts.get_owned_script(session, principal, path.script_id, for_update=True)
        audit(session, AuditAction.SCRIPT_DELETED, resource_type="script", resource_id=script.id, name=script.name,
              version=script.version)  # fmt: skip
        scripts.delete_script(session, script)
    return Response(status=204)


@bp.get("/<script_id>/versions", responses={200: ScriptVersionPage, 404: ErrorResponse, 422: ErrorResponse})
def list_versions(path: ScriptPath, query: VersionListQuery) -> Response:
    """Every code text the script has had, newest first, paged with ``cursor``."""
    with services().session_factory() as session:
        script = scripts.get_script(session, current_principal(), path.script_id)
        rows, next_cursor = scripts.list_versions(session, script, limit=query.limit, cursor=query.cursor)
        page = ScriptVersionPage(versions=[_version_view(r) for r in rows], next_cursor=next_cursor)
    return jsonify(page.model_dump(mode="json"))


@bp.get("/<script_id>/versions/<int:version>", responses={200: ScriptVersionView, 404: ErrorResponse})
def get_version(path: ScriptVersionPath) -> Response:
    """One version's code."""
    with services().session_factory() as session:
        script = scripts.get_script(session, current_principal(), path.script_id)
        row = scripts.get_version(session, script, path.version)
        return jsonify(_version_view(row).model_dump(mode="json"))
