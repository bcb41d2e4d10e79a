"""The artifact store's settings: parsed and checked at startup, handed to child processes, and the location a
new run gets under each backend."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from shared.errors import ConfigError
from shared.infra.artifact_store import ArtifactStore
from shared.infra.config import ArtifactStorage, Settings


def test_unset_means_the_data_directory(tmp_path: Path) -> None:
    settings = Settings.from_env({"ALPHAFORGE_DATA_DIR": str(tmp_path)})
    assert settings.artifacts == ArtifactStorage()
    store = ArtifactStore.from_settings(settings)
    run = uuid.uuid4()
    assert store.backend == "local"
    assert store.run_location("owner-1", run) == str(tmp_path.resolve() / "artifacts" / "owner-1" / str(run))


@pytest.mark.parametrize(
    ("raw", "url"),
    [
        ("s3://my-bucket", "s3://my-bucket"),
        ("s3://my-bucket/", "s3://my-bucket"),
        ("s3://my.bucket/runs/prod/", "s3://my.bucket/runs/prod"),
    ],
)
def test_s3_urls(raw: str, url: str) -> None:
    env = {
        "ALPHAFORGE_ARTIFACTS_URL": raw,
        "ALPHAFORGE_S3_ENDPOINT_URL": "http://127.0.0.1:9000/",
        "AWS_REGION": "eu-west-1",
        "AWS_ACCESS_KEY_ID": "key",
        "AWS_SECRET_ACCESS_KEY": "secret",
    }
    settings = Settings.from_env(env)
    assert settings.artifacts == ArtifactStorage(url, "http://127.0.0.1:9000", "eu-west-1", "key", "secret", None)
    assert "secret" not in repr(settings)
    run = uuid.uuid4()
    assert ArtifactStore.from_settings(settings).run_location("o", run) == f"{url}/o/{run}"
    # A child process (worker, API) sees the same store.
    assert Settings.from_env(settings.child_env()).artifacts == settings.artifacts


@pytest.mark.parametrize(
    "raw",
    ["/var/artifacts", "file:///tmp/x", "s3://", "s3://Bad_Bucket", "s3://b", "s3://bucket/a//b", "s3://bucket/../x"],
)
def test_bad_urls_stop_the_start(raw: str) -> None:
    with pytest.raises(ConfigError, match="ALPHAFORGE_ARTIFACTS_URL"):
        Settings.from_env({"ALPHAFORGE_ARTIFACTS_URL": raw})


def test_bad_endpoint_stops_the_start() -> None:
    with pytest.raises(ConfigError, match="ALPHAFORGE_S3_ENDPOINT_URL"):
        Settings.from_env({"ALPHAFORGE_S3_ENDPOINT_URL": "minio:9000"})


def test_local_store_round_trip(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path, ArtifactStorage())
    location = store.run_location("o", uuid.uuid4())
    assert store.get(location, "a.json") is None
    store.put(location, "a.json", b"{}")
    store.put(location, "b.csv", b"x,y\n")
    assert store.get(location, "a.json") == b"{}" and Path(location, "b.csv").read_bytes() == b"x,y\n"
    assert store.delete_run(location) == 2
    assert not Path(location).exists() and store.delete_run(location) == 0
