"""A run's artifacts: ``/api/runs/<run_id>/artifacts[/<name>]`` and ``/api/runs/<run_id>/manifest/verify``."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import uuid
from typing import Any

from flask import Response, jsonify, send_file
from flask_openapi3 import APIBlueprint, Tag
from pydantic import BaseModel, Field

from api import BEARER_SECURITY, services
from api.auth import current_principal
from api.schemas import ErrorResponse
from shared.accounts.access import require_read
from shared.errors import Conflict, NotFound
from shared.infra.models import Job, RunManifest
from shared.jobs.backtests import artifacts
from shared.jobs.backtests import read as runs

bp = APIBlueprint(
    "artifacts", __name__, url_prefix="/api/runs", abp_tags=[Tag(name="runs")], abp_security=BEARER_SECURITY
)


class RunPath(BaseModel):
    run_id: str


class ArtifactPath(BaseModel):
    run_id: str
    name: str = Field(max_length=64)


class ArtifactFile(BaseModel):
    name: str
    size: int
    sha256: str
    media_type: str
    url: str


class ArtifactsView(BaseModel):
    run_id: str
    status: str = Field(description="ready; pending while the run is active; missing if it ended without them")
    manifest_sha256: str | None
    chain_prev: str | None
    files: list[ArtifactFile]
    manifest_url: str | None


class FileCheck(BaseModel):
    name: str
    ok: bool
    problem: str | None


class VerifyView(BaseModel):
    ok: bool
    manifest_sha256: str
    manifest_ok: bool
    manifest_file_ok: bool
    chain_prev: str | None
    chain_ok: bool
    next_in_chain_ok: bool
    files: list[FileCheck]


def _not_found(raw: object) -> NotFound:
    return NotFound(f"run {str(raw)[:64]} not found", details={"run_id": str(raw)[:64]})


def _readable(raw_id: str) -> tuple[Job, RunManifest | None]:
    try:
        run_id = uuid.UUID(raw_id)
    except ValueError:
        raise _not_found(raw_id) from None
    with services().session_factory() as session:
        job, _ = runs.get_run(session, run_id)
        require_read(current_principal(), job.owner_id, _not_found(run_id))
        return job, artifacts.get_manifest(session, run_id)


def _require_manifest(job: Job, manifest: RunManifest | None) -> RunManifest:
    if manifest is None:
        state = "finished without artifacts" if _ended_without_artifacts(job) else "not built yet"
        raise Conflict(
            f"run {job.id} has no artifacts ({state})", details={"run_id": str(job.id), "status": job.status}
        )
    return manifest


BUILD_GRACE_S = 120
"""The worker builds the artifacts right after the run's last shard; after this long without them they are missing."""


def _ended_without_artifacts(job: Job) -> bool:
    if job.status not in runs.FINAL_STATUSES or job.finished_at is None:
        return False
    return (dt.datetime.now(dt.UTC) - job.finished_at).total_seconds() > BUILD_GRACE_S


@bp.get("/<run_id>/artifacts", responses={200: ArtifactsView, 404: ErrorResponse})
def list_artifacts(path: RunPath) -> Response:
    """The run's files with their sizes and SHA-256 (from its manifest)."""
    job, manifest = _readable(path.run_id)
    base = f"/api/runs/{job.id}/artifacts"
    if manifest is None:
        status = "missing" if _ended_without_artifacts(job) else "pending"
        view = ArtifactsView(
            run_id=str(job.id), status=status, manifest_sha256=None, chain_prev=None, files=[], manifest_url=None
        )
    else:
        files: list[dict[str, Any]] = manifest.manifest["files"]
        view = ArtifactsView(
            run_id=str(job.id),
            status="ready",
            manifest_sha256=manifest.manifest_sha256,
            chain_prev=manifest.chain_prev,
            files=[
                ArtifactFile(
                    name=f["name"],
                    size=f["size"],
                    sha256=f["sha256"],
                    media_type=artifacts.MEDIA_TYPES.get(f["name"], "application/octet-stream"),
                    url=f"{base}/{f['name']}",
                )
                for f in files
            ],
            manifest_url=f"{base}/{artifacts.MANIFEST_NAME}",
        )
    return jsonify(view.model_dump(mode="json"))


@bp.get("/<run_id>/artifacts/<name>", responses={200: None, 404: ErrorResponse, 409: ErrorResponse, 503: ErrorResponse})
def get_artifact(path: ArtifactPath) -> Response:
    """One artifact file (or ``manifest.json``) as stored."""
    job, manifest = _readable(path.run_id)
    content = artifacts.read_artifact(services().artifacts, _require_manifest(job, manifest), path.name)
    media_type = artifacts.MEDIA_TYPES.get(path.name, "application/octet-stream")
    etag = hashlib.sha256(content).hexdigest()  # of the bytes served, so a changed object never matches an old tag
    return send_file(io.BytesIO(content), mimetype=media_type, download_name=path.name, etag=etag, max_age=0)


@bp.get(
    "/<run_id>/manifest/verify",
    responses={200: VerifyView, 404: ErrorResponse, 409: ErrorResponse, 503: ErrorResponse},
)
def verify_manifest(path: RunPath) -> Response:
    """Recompute every file's size and SHA-256, the manifest's own hash and its link in your manifest chain."""
    job, manifest = _readable(path.run_id)
    checked = _require_manifest(job, manifest)
    with services().session_factory() as session:
        result = artifacts.verify(session, services().artifacts, checked)
    return jsonify(VerifyView.model_validate(result).model_dump(mode="json"))
