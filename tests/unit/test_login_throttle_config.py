"""The failed-login throttling settings: defaults, checks that name the variable, and the child processes' copy."""

from __future__ import annotations

import pytest

from shared.infra.config import ConfigError, Settings


def test_defaults_keep_the_pair_limit_below_the_account_limit() -> None:
    rates = Settings.from_env({}).rate_limits
    assert (rates.login, rates.failed_login_pair, rates.failed_login_user) == (
        "10/minute", "5 per 15 minutes", "20 per 15 minutes")  # fmt: skip
    assert (rates.failed_login_address, rates.failed_login_usernames, rates.login_known_days) == (
        "100 per 15 minutes", "20 per 15 minutes", 30)  # fmt: skip


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"ALPHAFORGE_RATE_LIMIT_FAILED_LOGIN_PAIR": "often"}, "ALPHAFORGE_RATE_LIMIT_FAILED_LOGIN_PAIR"),
        ({"ALPHAFORGE_RATE_LIMIT_FAILED_LOGIN_USERNAMES": "5/minute;20/hour"}, "USERNAMES must be one rate"),
        ({"ALPHAFORGE_LOGIN_KNOWN_DAYS": "-1"}, "ALPHAFORGE_LOGIN_KNOWN_DAYS"),
    ],
)
def test_bad_settings_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Settings.from_env(env)


def test_child_processes_see_the_same_settings() -> None:
    settings = Settings.from_env({"ALPHAFORGE_RATE_LIMIT_FAILED_LOGIN_PAIR": "3 per 10 minutes",
                                  "ALPHAFORGE_RATE_LIMIT_FAILED_LOGIN_USERNAMES": "7 per hour",
                                  "ALPHAFORGE_LOGIN_KNOWN_DAYS": "0"})  # fmt: skip
    assert Settings.from_env(settings.child_env()).rate_limits == settings.rate_limits
