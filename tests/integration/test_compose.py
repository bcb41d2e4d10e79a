"""docker-compose.yml checked without a Docker daemon (none runs here): its services, commands, health checks and
volumes must name real modules, queues and endpoints; and each worker service's command, run for real, consumes the
queues the deployment promises (interactive work on every worker, the nightly flood only on bulk workers)."""

from __future__ import annotations

import importlib
import importlib.util
import re
import shlex
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import yaml  # type: ignore[import-untyped]
from flask import Flask

from shared.contract import create_celery
from shared.infra.config import QUEUE_BULK, QUEUE_INTERACTIVE, QUEUE_MAINTENANCE, QUEUE_SANDBOX, Settings
from shared.infra.migrate import PROJECT_ROOT
from tests.integration.test_faults_worker_kill import Processes

COMPOSE = PROJECT_ROOT / "docker-compose.yml"
APP_SERVICES = {"migrate", "api", "worker-interactive", "worker-bulk", "beat", "flower"}
WORKER_QUEUES = {
    "worker-interactive": {QUEUE_SANDBOX, QUEUE_INTERACTIVE, QUEUE_MAINTENANCE},
    "worker-bulk": {QUEUE_SANDBOX, QUEUE_BULK, QUEUE_INTERACTIVE},
}
COMPOSE_REDIS_DB = 10


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return loaded


def command(service: dict[str, Any]) -> list[str]:
    raw = service["command"]
    return shlex.split(raw) if isinstance(raw, str) else [str(part) for part in raw]


def option(argv: list[str], name: str) -> str:
    (value,) = [a.split("=", 1)[1] for a in argv if a.startswith(f"{name}=")]
    return value


def test_every_service_is_there_with_a_health_check_and_declared_volumes(compose: dict[str, Any]) -> None:
    services: dict[str, Any] = compose["services"]
    assert set(services) == APP_SERVICES | {"postgres", "redis"}
    for name, service in services.items():
        if name != "migrate":
            assert service.get("healthcheck", {}).get("test"), f"{name} has no health check"
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on unknown {dependency}"
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            assert source in compose["volumes"], f"{name} mounts undeclared volume {source}"
    for name in APP_SERVICES:
        assert services[name]["build"] == "." and services[name]["init"] is True
    assert services["postgres"]["volumes"] and services["redis"]["volumes"]
    assert "noeviction" in services["redis"]["command"]  # an evicted task message would be a lost job


def test_commands_name_real_modules_and_the_api_checks_readiness(compose: dict[str, Any], flask_app: Flask) -> None:
    services: dict[str, Any] = compose["services"]
    for name in APP_SERVICES:
        argv = command(services[name])
        assert argv[:2] == ["python", "-m"], name
        assert importlib.util.find_spec(argv[2]) is not None, f"{name}: no module {argv[2]}"
    api = command(services["api"])
    assert api[2] == "gunicorn"
    config_module = api[api.index("--config") + 1].removeprefix("python:")
    assert importlib.util.find_spec(config_module) is not None
    module_name, _, factory = api[-1].partition(":")
    assert callable(getattr(importlib.import_module(module_name), factory.removesuffix("()")))
    assert "JWT_SECRET_KEY" in services["api"]["environment"]
    probe = " ".join(services["api"]["healthcheck"]["test"])
    (path,) = re.findall(r"http://127\.0\.0\.1:8000(/[\w/]+)", probe)
    assert path == "/api/health/ready"
    assert path in {rule.rule for rule in flask_app.url_map.iter_rules()}
    flower = services["flower"]
    assert "--persistent=False" in command(flower) and "FLOWER_BASIC_AUTH" in flower["environment"]
    assert "/healthcheck" in " ".join(flower["healthcheck"]["test"])


def test_worker_services_split_the_queues_so_users_are_never_starved(compose: dict[str, Any]) -> None:
    services: dict[str, Any] = compose["services"]
    declared = {q.name for q in create_celery(Settings(redis_url="redis://127.0.0.1:1/0")).conf.task_queues}
    consumers: dict[str, set[str]] = {}
    for name, queues in WORKER_QUEUES.items():
        argv = command(services[name])
        assert argv[2:4] == ["worker", "worker"]
        consumed = set(option(argv, "--queues").split(","))
        assert consumed == queues and consumed <= declared, name
        for queue in consumed:
            consumers.setdefault(queue, set()).add(name)
        hostname = option(argv, "--hostname")
        assert hostname.endswith("@%h") and hostname.split("@")[0] in " ".join(services[name]["healthcheck"]["test"])
    assert consumers[QUEUE_INTERACTIVE] == set(WORKER_QUEUES)  # every worker takes users' work
    assert consumers[QUEUE_SANDBOX] == set(WORKER_QUEUES)  # and interactive runs, before anything else
    assert consumers[QUEUE_BULK] == {"worker-bulk"}  # the nightly flood never takes an interactive worker's slot
    assert consumers[QUEUE_MAINTENANCE] == {"worker-interactive"}
    assert set(consumers) == declared


@pytest.fixture
def compose_settings(settings: Settings) -> Iterator[Settings]:
    base, _, _db = settings.require_redis_url().rpartition("/")
    own = settings.with_overrides(redis_url=f"{base}/{COMPOSE_REDIS_DB}")
    client = redis.Redis.from_url(own.require_redis_url())
    client.flushdb()
    yield own
    client.flushdb()
    client.close()


def test_the_worker_commands_consume_the_queues_they_promise(
    compose: dict[str, Any], compose_settings: Settings
) -> None:
    """The compose commands run for real (``--queues`` given after the defaults of ``python -m worker`` wins)."""
    procs = Processes(compose_settings)
    app = create_celery(compose_settings)
    try:
        hostnames = {}
        for name in WORKER_QUEUES:
            argv = command(compose["services"][name])
            prefix = option(argv, "--hostname").split("@")[0]
            argv = [a if not a.startswith("--hostname=") else f"--hostname={prefix}@compose-test" for a in argv]
            procs.start(f"compose-{name}", *argv[3:], "--concurrency=1")
            hostnames[name] = f"{prefix}@compose-test"
        deadline = time.monotonic() + 60
        while True:
            active = app.control.inspect(timeout=1.0).active_queues() or {}
            if set(hostnames.values()) <= set(active):
                break
            assert time.monotonic() < deadline, active
        for name, hostname in hostnames.items():
            assert {q["name"] for q in active[hostname]} == WORKER_QUEUES[name], (name, active[hostname])
    finally:
        app.close()
        procs.stop_all()
