"""Webhook secrets and delivery attempts: ``/api/auth/webhook-secret`` and ``/api/jobs/<id>/callback-deliveries``."""

from __future__ import annotations

import uuid

from flask import Response, jsonify
from flask_openapi3 import APIBlueprint, Tag
from pydantic import BaseModel
from sqlalchemy import select

from api import BEARER_SECURITY, services
from api.auth import current_principal
from api.schemas import ErrorResponse, JobPath
from shared.accounts.access import require_read
from shared.errors import NotFound
from shared.infra.db import session_scope
from shared.infra.models import WebhookDelivery
from shared.jobs import pipeline as jobs
from shared.jobs import webhooks

bp = APIBlueprint(
    "webhooks", __name__, url_prefix="/api", abp_tags=[Tag(name="webhooks")], abp_security=BEARER_SECURITY
)


class WebhookSecret(BaseModel):
    secret: str


class Delivery(BaseModel):
    attempt: int
    status_code: int | None
    error: str | None
    duration_ms: float | None
    created_at: str


class Deliveries(BaseModel):
    job_id: str
    deliveries: list[Delivery]


def _secret(rotate: bool) -> Response:
    principal = current_principal()
    with session_scope(services().session_factory) as session:
        secret = webhooks.ensure_secret(session, principal.user_id, rotate=rotate)
    return jsonify(WebhookSecret(secret=secret).model_dump())


@bp.get("/auth/webhook-secret", responses={200: WebhookSecret})
def get_secret() -> Response:
    """Your webhook signing secret (made on first use): verify ``X-AlphaForge-Signature`` with it."""
    return _secret(rotate=False)


@bp.post("/auth/webhook-secret/rotate", responses={200: WebhookSecret})
def rotate_secret() -> Response:
    """Replace your webhook signing secret; deliveries from now on are signed with the new one."""
    return _secret(rotate=True)


@bp.get("/jobs/<job_id>/callback-deliveries", responses={200: Deliveries, 404: ErrorResponse})
def deliveries(path: JobPath) -> Response:
    """Every delivery attempt of the job's webhook, oldest first."""
    try:
        job_id = uuid.UUID(path.job_id)
    except ValueError:
        raise NotFound(f"job {path.job_id[:64]} not found", details={"job_id": path.job_id[:64]}) from None
    with services().session_factory() as session:
        job = jobs.get_job(session, job_id)
        require_read(
            current_principal(), job.owner_id, NotFound(f"job {job_id} not found", details={"job_id": str(job_id)})
        )
        rows = session.scalars(
            select(WebhookDelivery).where(WebhookDelivery.job_id == job_id).order_by(WebhookDelivery.attempt)
        ).all()
        view = Deliveries(
            job_id=str(job_id),
            deliveries=[
                Delivery(
                    attempt=r.attempt,
                    status_code=r.status_code,
                    error=r.error,
                    duration_ms=r.duration_ms,
                    created_at=r.created_at.isoformat(),
                )
                for r in rows
            ],
        )
    return jsonify(view.model_dump())
