"""Where run artifacts live: the data directory (the default) or an S3 bucket, behind one small interface.

``ALPHAFORGE_ARTIFACTS_URL`` chooses: unset writes under ``<data dir>/artifacts/<owner>/<run id>/``;
``s3://bucket/prefix`` writes the objects ``prefix/<owner>/<run id>/<name>`` (endpoint, region and credentials in
``Settings.artifacts``). Both backends are obstore stores (``LocalStore``, ``S3Store``), so writing, serving,
verification and retention's deletion run the same code whatever the backend.

A run's *location* (a directory path, or ``s3://bucket/key-prefix``) is recorded in its manifest row and every
later read resolves that string: runs written before a change of the setting stay readable, verifiable and
deletable (given credentials for their bucket).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import obstore
from obstore.exceptions import BaseError
from obstore.store import LocalStore, S3Store

from shared.errors import ServiceUnavailable
from shared.infra.config import ArtifactStorage, Settings

if TYPE_CHECKING:
    from obstore.store import ClientConfig, RetryConfig, S3Config

S3_SCHEME = "s3://"
RETRIES: RetryConfig = {"max_retries": 3, "retry_timeout": dt.timedelta(seconds=20)}
"""A store that is down answers within seconds (a 503), not after obstore's default of ten tries in 3 minutes."""


@contextlib.contextmanager
def _unavailable_on_error(action: str, location: str) -> Iterator[None]:
    """A store that fails (down, refusing our credentials, no such bucket) is a 503 naming the action, not a 500."""
    try:
        yield
    except (BaseError, OSError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        where = location.split("://", 1)[0] if "://" in location else "local"
        raise ServiceUnavailable(
            f"artifact store ({where}) failed to {action}: {str(exc).splitlines()[0][:300]}",
            details={"action": action},
        ) from exc


class ArtifactStore:
    """Put, get and delete the files of one run's artifact folder, addressed by its location string."""

    def __init__(self, data_dir: Path, config: ArtifactStorage) -> None:
        self.data_dir = data_dir
        self.config = config
        self._local = LocalStore("/")
        self._buckets: dict[str, S3Store] = {}

    @classmethod
    def from_settings(cls, settings: Settings) -> ArtifactStore:
        return cls(settings.data_dir, settings.artifacts)

    @property
    def backend(self) -> str:
        return "s3" if self.config.url else "local"

    def run_location(self, owner_id: str, job_id: uuid.UUID) -> str:
        """Where a new run's artifacts go under the current setting."""
        if self.config.url:
            return f"{self.config.url}/{owner_id}/{job_id}"
        return str((self.data_dir / "artifacts" / owner_id / str(job_id)).resolve())

    def put(self, location: str, name: str, data: bytes | Path) -> None:
        """Write one object: bytes, or a local file (streamed in parts, never read whole)."""
        store, key = self._resolve(location)
        with _unavailable_on_error("write", location):
            obstore.put(store, f"{key}/{name}", data)

    def get(self, location: str, name: str) -> bytes | None:
        """The object's bytes; None if it does not exist."""
        store, key = self._resolve(location)
        try:
            with _unavailable_on_error("read", location):
                return bytes(obstore.get(store, f"{key}/{name}").bytes())
        except FileNotFoundError:
            return None

    def delete_run(self, location: str) -> int:
        """Delete every object of a run's folder; returns how many there were (0: nothing was there)."""
        store, key = self._resolve(location)
        with _unavailable_on_error("delete", location):
            paths = [meta["path"] for chunk in obstore.list(store, prefix=f"{key}/") for meta in chunk]
            if paths:
                obstore.delete(store, paths)
        if not location.startswith(S3_SCHEME):  # a folder has no existence of its own in a bucket; on disk it does
            with contextlib.suppress(OSError):
                os.rmdir(self._local_path(location))
        return len(paths)

    # --- locations -------------------------------------------------------------------------------------------

    def _resolve(self, location: str) -> tuple[LocalStore | S3Store, str]:
        if location.startswith(S3_SCHEME):
            bucket, _, key = location[len(S3_SCHEME) :].partition("/")
            return self._bucket(bucket), key.strip("/")
        return self._local, str(self._local_path(location)).lstrip("/")

    @staticmethod
    def _local_path(location: str) -> Path:
        return Path(location).resolve()

    def _bucket(self, bucket: str) -> S3Store:
        store = self._buckets.get(bucket)
        if store is None:
            store = self._buckets[bucket] = S3Store(
                bucket, config=self._s3_config(), client_options=self._client_options(), retry_config=RETRIES
            )
        return store

    def _s3_config(self) -> S3Config:
        c = self.config
        config: S3Config = {}
        if c.s3_endpoint_url:
            config["endpoint"] = c.s3_endpoint_url
        if c.s3_region:
            config["region"] = c.s3_region
        if c.s3_access_key_id:
            config["access_key_id"] = c.s3_access_key_id
        if c.s3_secret_access_key:
            config["secret_access_key"] = c.s3_secret_access_key
        if c.s3_session_token:
            config["session_token"] = c.s3_session_token
        return config

    def _client_options(self) -> ClientConfig:
        endpoint = self.config.s3_endpoint_url or ""
        return {"allow_http": endpoint.startswith("http://"), "timeout": "30s", "connect_timeout": "5s"}
