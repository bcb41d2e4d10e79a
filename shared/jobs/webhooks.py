"""Webhooks: when a job with a ``callback_url`` ends, POST a signed JSON summary to it, with bounded retries.

Server-side request forgery is the risk (Judge0's CVE): a user names a URL and our servers call it. So only
``http``/``https`` URLs with a host; every address the host resolves to must be a public one (no loopback,
private, link-local, shared, multicast or reserved addresses) unless the operator allows private targets
(``ALPHAFORGE_WEBHOOK_ALLOW_PRIVATE``). The check runs when the job is submitted (422) and again at each delivery,
and the delivery connects to the very address it checked (a DNS answer that changes in between cannot redirect
it); redirects are not followed.

Signature: ``X-AlphaForge-Signature: t=<unix time>,v1=<hex HMAC-SHA256 of "<t>.<body>">`` with the job owner's
webhook secret (``GET /api/auth/webhook-secret``). Receivers recompute it and reject old timestamps.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import http.client
import ipaddress
import json
import logging
import random
import secrets
import socket
import ssl
import time
import uuid
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import select, text
from sqlalchemy.orm import Session, sessionmaker

from shared.errors import ValidationFailed
from shared.infra.db import session_scope
from shared.infra.models import Job, JobKind, JobShard, User, WebhookDelivery
from shared.jobs import backoff

log = logging.getLogger(__name__)

MAX_URL_CHARS = 2000
MAX_RESPONSE_BYTES = 4096
FINISHED = ("succeeded", "partial", "failed", "cancelled")


class UnsafeUrl(ValueError):
    pass


Resolver = Callable[[str, int], list[str]]


def resolve(host: str, port: int) -> list[str]:
    return sorted({str(info[4][0]) for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)})


def check_url(url: str, *, allow_private: bool, resolver: Resolver = resolve) -> tuple[str, int, list[str]]:
    """(host, port, the addresses it may be reached at) or UnsafeUrl with the reason."""
    if len(url) > MAX_URL_CHARS:
        raise UnsafeUrl(f"at most {MAX_URL_CHARS} characters")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise UnsafeUrl("only http and https URLs are allowed")
    if not parts.hostname:
        raise UnsafeUrl("the URL has no host")
    if parts.username or parts.password:
        raise UnsafeUrl("credentials in the URL are not allowed")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise UnsafeUrl("invalid port") from None
    try:
        addresses = resolver(parts.hostname, port)
    except OSError as exc:
        raise UnsafeUrl(f"cannot resolve {parts.hostname}: {exc}") from None
    if not addresses:
        raise UnsafeUrl(f"{parts.hostname} has no address")
    if not allow_private:
        for address in addresses:
            ip = ipaddress.ip_address(address.split("%")[0])
            if not ip.is_global or ip.is_multicast:
                raise UnsafeUrl(f"{parts.hostname} resolves to {ip}, a non-public address (not allowed)")
    return parts.hostname, port, addresses


def validate_callback_url(url: str, *, allow_private: bool) -> str:
    """The check at submission: a 422 on ``callback_url`` if the URL may not be called."""
    try:
        check_url(url, allow_private=allow_private)
    except UnsafeUrl as exc:
        raise ValidationFailed.for_field("callback_url", str(exc)) from None
    return url


def new_secret() -> str:
    return "whsec_" + secrets.token_urlsafe(32)


def ensure_secret(session: Session, user_id: str, *, rotate: bool = False) -> str:
    """The user's webhook secret, made on first use (or replaced when ``rotate``)."""
    user = session.get(User, user_id, with_for_update=True)
    assert user is not None
    if rotate or not user.webhook_secret:
        user.webhook_secret = new_secret()
    return user.webhook_secret


def sign(secret: str, timestamp: int, body: bytes) -> str:
    digest = hmac.new(secret.encode(), str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def event_name(job: Job) -> str:
    """``run.finished`` for a backtest run, ``optimization.finished`` for an optimisation, ``job.finished`` for any
    other job."""
    if job.kind == JobKind.BACKTEST.value:
        return "run.finished"
    if job.kind == JobKind.OPTIMIZATION.value:
        return "optimization.finished"
    return "job.finished"


def _links(job: Job) -> dict[str, str]:
    if job.kind == JobKind.BACKTEST.value:
        base = f"/api/runs/{job.id}"
        return {
            "self": base,
            "results": f"{base}/results",
            "artifacts": f"{base}/artifacts",
            "job": f"/api/jobs/{job.id}",
        }
    if job.kind == JobKind.OPTIMIZATION.value:
        base = f"/api/optimizations/{job.id}"
        return {
            "self": base,
            "results": f"{base}/results",
            "artifacts": f"{base}/artifacts",
            "job": f"/api/jobs/{job.id}",
        }
    return {"self": f"/api/jobs/{job.id}", "results": f"/api/jobs/{job.id}/results"}


def summary(job: Job) -> dict[str, Any]:
    return {
        "event": event_name(job),
        "job_id": str(job.id),
        "kind": job.kind,
        "status": job.status,
        "error": job.error,
        "progress": {
            "shards_total": job.shards_total,
            "shards_done": job.shards_done,
            "shards_failed": job.shards_failed,
            "symbols_total": job.symbols_total,
            "symbols_done": job.symbols_done,
            "symbols_failed": job.symbols_failed,
        },
        "created_at": job.created_at.isoformat(),
        "finished_at": job.finished_at.isoformat() if job.finished_at else None,
        "links": _links(job),
    }


@dataclass(frozen=True)
class Attempt:
    status_code: int | None
    error: str | None
    duration_ms: float

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


def post(url: str, body: bytes, headers: dict[str, str], *, allow_private: bool, timeout_s: float) -> Attempt:
    """One POST to the address that passed the check (TLS verified against the host name); no redirects."""
    started = time.perf_counter()
    try:
        host, port, addresses = check_url(url, allow_private=allow_private)
        parts = urlsplit(url)
        sock = socket.create_connection((addresses[0], port), timeout=timeout_s)
        if parts.scheme == "https":
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=host)
        conn = http.client.HTTPConnection(host, port, timeout=timeout_s)
        conn.sock = sock
        try:
            path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            conn.request("POST", path, body=body, headers={**headers, "Content-Type": "application/json"})
            response = conn.getresponse()
            response.read(MAX_RESPONSE_BYTES)
            status = response.status
        finally:
            conn.close()
        error = None if 200 <= status < 300 else f"HTTP {status}"
        return Attempt(status, error, 1000 * (time.perf_counter() - started))
    except (UnsafeUrl, OSError, http.client.HTTPException) as exc:
        return Attempt(None, f"{type(exc).__name__}: {exc}"[:500], 1000 * (time.perf_counter() - started))


MAX_BACKOFF_S = 3600.0


def backoff_s(attempt: int, base_s: float, *, uniform: backoff.Uniform = random.uniform) -> float:
    """Seconds before attempt ``attempt + 1``: drawn from [0, base], [0, 2 base], [0, 4 base], ... capped at an
    hour (full jitter, shared/jobs/backoff.py: receivers that were down for everyone are not hit all at once)."""
    return backoff.full_jitter_s(attempt - 1, base_s, MAX_BACKOFF_S, uniform=uniform)


def dispatch(
    factory: sessionmaker[Session],
    *,
    allow_private: bool,
    max_attempts: int,
    backoff_base_s: float,
    timeout_s: float,
    limit: int = 20,
    job_ids: Collection[uuid.UUID] | None = None,
    uniform: backoff.Uniform = random.uniform,
) -> int:
    """Deliver what is due: finished jobs whose callback is pending and whose next attempt time has come (only
    ``job_ids`` when given). Each job is locked while its attempt runs (others skip it). Returns the number of
    attempts made. A failed attempt schedules the next one after :func:`backoff_s` (drawn with ``uniform``)."""
    made = 0
    is_due = (Job.callback_state == "pending") & (
        (Job.callback_next_at.is_(None)) | (Job.callback_next_at <= text("now()"))
    )
    query = select(Job.id).where(is_due, Job.status.in_(FINISHED)).order_by(Job.finished_at).limit(limit)
    if job_ids is not None:
        query = query.where(Job.id.in_(list(job_ids)))
    with factory() as session:
        due = list(session.scalars(query))
    for job_id in due:
        with session_scope(factory) as session:
            job = session.scalars(
                # Due still: another dispatcher may have made an attempt since the list was read.
                select(Job).where(Job.id == job_id, is_due).with_for_update(skip_locked=True)
            ).first()
            if job is None or job.callback_url is None:
                continue
            secret = ensure_secret(session, job.owner_id) if job.owner_id else new_secret()
            body = json.dumps(summary(job), separators=(",", ":")).encode()
            delivery_id = str(uuid.uuid4())
            headers = {
                "X-AlphaForge-Signature": sign(secret, int(time.time()), body),
                "X-AlphaForge-Event": event_name(job),
                "X-AlphaForge-Delivery": delivery_id,
                "User-Agent": "AlphaForge-Webhooks/1",
            }
            attempt_no = job.callback_attempts + 1
            result = post(job.callback_url, body, headers, allow_private=allow_private, timeout_s=timeout_s)
            delivery = WebhookDelivery(job_id=job.id, attempt=attempt_no, url=job.callback_url,
                                       status_code=result.status_code, error=result.error,
                                       duration_ms=round(result.duration_ms, 1))  # fmt: skip
            session.add(delivery)
            job.callback_attempts = attempt_no
            job.callback_last_error = result.error
            if result.ok:
                job.callback_state = "delivered"
                job.callback_next_at = None
            elif attempt_no >= max_attempts:
                job.callback_state = "failed"
                job.callback_next_at = None
                log.warning("webhook of job %s failed for good after %d attempts: %s", job.id, attempt_no,
                            result.error)  # fmt: skip
            else:
                now = session.scalar(select(text("now()")))
                assert isinstance(now, dt.datetime)
                job.callback_next_at = now + dt.timedelta(
                    seconds=backoff_s(attempt_no, backoff_base_s, uniform=uniform)
                )
            made += 1
    return made


def first_delivery_due(session: Session, shard_id: int) -> uuid.UUID | None:
    """The job of ``shard_id`` when it has ended with its webhook not yet tried: what a worker that just ran the
    shard checks, to start the delivery at once (the beat poll stays as the backstop, and for the retries)."""
    return session.scalar(
        select(Job.id)
        .join(JobShard, JobShard.job_id == Job.id)
        .where(JobShard.id == shard_id, Job.callback_state == "pending", Job.status.in_(FINISHED))
        .where(Job.callback_attempts == 0)
    )


def job_first_delivery_due(session: Session, job_id: uuid.UUID) -> bool:
    """The job has ended with its webhook not yet tried (:func:`first_delivery_due`, by job): what the worker task that
    finalizes a job ended with no shard left checks, to start the delivery once the job's views are complete."""
    due = session.scalar(
        select(Job.id).where(
            Job.id == job_id, Job.callback_state == "pending", Job.status.in_(FINISHED), Job.callback_attempts == 0
        )
    )
    return due is not None
