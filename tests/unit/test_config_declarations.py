"""Every setting is declared once (shared/infra/config.py): README's Configuration table is exactly the declared
settings, each documented, with its default; what a child process gets reads back to the same settings."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from shared.errors import ConfigError
from shared.infra.config import Settings
from shared.infra.settings_schema import declared, markdown_table

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_table() -> list[str]:
    section = README.read_text().split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    return [line for line in section.splitlines() if line.startswith("|")]


def test_readme_lists_exactly_the_declared_settings() -> None:
    rows = readme_table()
    in_readme = [re.match(r"\| `([A-Z0-9_]+)` \|", row) for row in rows[2:]]
    assert all(in_readme), "every row names one variable"
    names = [m.group(1) for m in in_readme if m]
    declared_names = [item.setting.env for item in declared(Settings)]
    assert len(set(declared_names)) == len(declared_names), "one declaration per variable"
    assert sorted(names) == sorted(declared_names)


def test_readme_table_is_the_generated_one() -> None:
    # the defaults and meanings too; regenerate with `.venv/bin/python -m shared.infra.config`
    assert readme_table() == markdown_table(Settings).splitlines()


def test_every_setting_is_documented_and_its_default_is_the_fields() -> None:
    plain = Settings()
    for item in declared(Settings):
        doc = item.setting.doc
        assert doc and "\n" not in doc and not doc.endswith("."), item.setting.env
        value: object = plain
        for name in item.path:
            value = getattr(value, name)
        assert value == item.default, item.setting.env
        if item.setting.ge == 0:  # zero allowed: the doc says what it means
            assert "`0`" in doc, item.setting.env


def test_defaults_read_from_an_empty_environment() -> None:
    assert Settings.from_env({}) == Settings()


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"ALPHAFORGE_API_PORT": "eighty"}, r"^ALPHAFORGE_API_PORT must be an integer, got 'eighty'$"),
        ({"ALPHAFORGE_SHARD_SIZE": "0"}, r"^ALPHAFORGE_SHARD_SIZE must be >= 1, got 0$"),
        ({"ALPHAFORGE_SANDBOX_MEMORY_MB": "32"}, r"^ALPHAFORGE_SANDBOX_MEMORY_MB must be >= 64, got 32$"),
        ({"ALPHAFORGE_WEBHOOK_TIMEOUT": "0"}, r"^ALPHAFORGE_WEBHOOK_TIMEOUT must be > 0"),
        ({"ALPHAFORGE_REGISTRATION_OPEN": "maybe"}, r"^ALPHAFORGE_REGISTRATION_OPEN must be true or false"),
        ({"ALPHAFORGE_LOG_LEVEL": "loud"}, r"^ALPHAFORGE_LOG_LEVEL must be DEBUG, INFO"),
        ({"ALPHAFORGE_NIGHTLY_SCHEDULE": "1 2 3"}, r"^ALPHAFORGE_NIGHTLY_SCHEDULE must be 5 cron fields"),
        ({"ALPHAFORGE_NIGHTLY_SCHEDULE": "99 2 * * *"}, r"^ALPHAFORGE_NIGHTLY_SCHEDULE is not a valid cron"),
        ({"ALPHAFORGE_EXCHANGE_TIMEZONE": "Mars/Base"}, r"^ALPHAFORGE_EXCHANGE_TIMEZONE is not a known time zone"),
        ({"ALPHAFORGE_DEMO_SYMBOLS": "-1"}, r"^ALPHAFORGE_DEMO_SYMBOLS must be >= 0, got -1$"),
        (
            {"ALPHAFORGE_RESTART_BACKOFF": "10", "ALPHAFORGE_RESTART_BACKOFF_MAX": "5"},
            r"BACKOFF_MAX \(5.0\) must be >=",
        ),
        # every bad value is named, not only the first
        ({"ALPHAFORGE_API_PORT": "x", "ALPHAFORGE_RETENTION_DAYS": "-2"}, r"API_PORT .*; ALPHAFORGE_RETENTION_DAYS"),
    ],
)
def test_bad_values_stop_the_start_naming_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Settings.from_env(env)


def test_values_are_normalised_and_blank_is_unset() -> None:
    env = {"ALPHAFORGE_LOG_LEVEL": " debug ", "ALPHAFORGE_NIGHTLY_SCHEDULE": " OFF ", "ALPHAFORGE_API_PORT": "",
           "ALPHAFORGE_REGISTRATION_OPEN": "no", "AWS_DEFAULT_REGION": "eu-north-1"}  # fmt: skip
    settings = Settings.from_env(env)
    assert (settings.log_level, settings.maintenance.nightly_schedule, settings.api_port) == ("DEBUG", "off", 8000)
    assert settings.registration_open is False and settings.artifacts.s3_region == "eu-north-1"
    region = Settings.from_env({"ALPHAFORGE_S3_REGION": "us-east-2", "AWS_REGION": "eu-west-1"}).artifacts.s3_region
    assert region == "us-east-2"  # the own variable before the AWS ones


def test_child_processes_see_the_same_settings_but_not_the_one_child_secrets() -> None:
    env = {item.setting.env: "" for item in declared(Settings)}
    env |= {"ALPHAFORGE_API_THREADS": "9", "ALPHAFORGE_WEBHOOK_ALLOW_PRIVATE": "true", "ALPHAFORGE_DATA_DIR": "/x",
            "ALPHAFORGE_METRICS_TOKEN": "m" * 32, "JWT_SECRET_KEY": "j" * 40, "FLOWER_BASIC_AUTH": "ops:" + "p" * 12,
            "DATABASE_URL": "postgresql://db/x", "ALPHAFORGE_HEALTH_CACHE": "0"}  # fmt: skip
    settings = Settings.from_env(env)
    child = settings.child_env()
    assert "JWT_SECRET_KEY" not in child and "FLOWER_BASIC_AUTH" not in child  # the launcher hands each to one child
    assert Settings.from_env(child) == settings.with_overrides(jwt_secret_key=None, flower_basic_auth=None)
    assert "j" * 40 not in repr(settings) and "m" * 32 not in repr(settings)
