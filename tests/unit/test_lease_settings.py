"""Shard lease and reconciler settings: defaults that recover a dead worker's shards within 15 s, validation, and
the schedule beat builds from them."""

from __future__ import annotations

import pytest

from shared.contract import TASK_RECONCILE_SHARDS, beat_schedule
from shared.infra.config import ConfigError, Settings


def test_defaults_bound_the_recovery_of_a_dead_workers_shards() -> None:
    maint = Settings.from_env({}).maintenance
    assert (maint.shard_lease_s, maint.shard_lease_renew_s, maint.reconcile_interval_s) == (6.0, 2.0, 2.0)
    # worst case from the kill: the lease runs out, the next pass, its worker query (2 s): well inside 15 s
    assert maint.shard_lease_s + maint.reconcile_interval_s + 2.0 <= 10.0
    assert maint.queued_pass_interval_s == 60.0  # queued shards: half the 120 s grace, the old cadence


def test_settings_reach_child_processes() -> None:
    env = {"ALPHAFORGE_SHARD_LEASE": "20", "ALPHAFORGE_SHARD_LEASE_RENEW": "5", "ALPHAFORGE_RECONCILE_INTERVAL": "4"}
    child = Settings.from_env(Settings.from_env(env).child_env()).maintenance
    assert (child.shard_lease_s, child.shard_lease_renew_s, child.reconcile_interval_s) == (20.0, 5.0, 4.0)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"ALPHAFORGE_SHARD_LEASE": "4", "ALPHAFORGE_SHARD_LEASE_RENEW": "3"}, "at most half of ALPHAFORGE_SHARD_"),
        ({"ALPHAFORGE_SHARD_LEASE": "0"}, "ALPHAFORGE_SHARD_LEASE"),
        ({"ALPHAFORGE_SHARD_LEASE_RENEW": "-1"}, "ALPHAFORGE_SHARD_LEASE_RENEW"),
        ({"ALPHAFORGE_SHARD_LEASE": "soon"}, "ALPHAFORGE_SHARD_LEASE must be a number"),
    ],
)
def test_bad_lease_settings_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Settings.from_env(env)


def test_beat_runs_the_lease_pass_often_and_the_full_pass_at_the_queued_cadence() -> None:
    schedule = beat_schedule(Settings.from_env({"ALPHAFORGE_RECONCILE_GRACE": "30"}))
    frequent, full = schedule["reconcile-shards"], schedule["reconcile-queued-shards"]
    assert frequent["task"] == full["task"] == TASK_RECONCILE_SHARDS
    assert (frequent["schedule"], frequent["kwargs"]) == (2.0, {"queued": False})
    assert full["schedule"] == 15.0 and "kwargs" not in full  # max(interval, grace / 2); the task's default: all
