"""The API server's settings: threads, and the event-stream limit that keeps threads free for other requests."""

from __future__ import annotations

import pytest

from shared.infra.config import ConfigError, Settings


def test_defaults_leave_threads_for_requests() -> None:
    api = Settings.from_env({}).api
    assert (api.workers, api.threads, api.sse_max_streams, api.sse_max_streams_per_user) == (2, 16, 12, 4)
    assert (api.sse_heartbeat_s, api.sse_slot_lease_s) == (15.0, 45.0)


def test_stream_limit_follows_the_thread_count() -> None:
    assert Settings.from_env({"ALPHAFORGE_API_THREADS": "32"}).api.sse_max_streams == 28
    assert Settings.from_env({"ALPHAFORGE_API_THREADS": "3"}).api.sse_max_streams == 1


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"ALPHAFORGE_API_THREADS": "8", "ALPHAFORGE_SSE_MAX_STREAMS": "8"}, "ALPHAFORGE_SSE_MAX_STREAMS"),
        ({"ALPHAFORGE_API_THREADS": "1"}, "ALPHAFORGE_API_THREADS"),
        ({"ALPHAFORGE_SSE_MAX_STREAMS_PER_USER": "0"}, "ALPHAFORGE_SSE_MAX_STREAMS_PER_USER"),
        ({"ALPHAFORGE_SSE_HEARTBEAT_S": "0"}, "ALPHAFORGE_SSE_HEARTBEAT_S"),
        ({"ALPHAFORGE_SSE_SLOT_LEASE_S": "soon"}, "ALPHAFORGE_SSE_SLOT_LEASE_S"),
        ({"ALPHAFORGE_SSE_SLOT_LEASE_S": "20"}, "ALPHAFORGE_SSE_SLOT_LEASE_S .* twice ALPHAFORGE_SSE_HEARTBEAT_S"),
    ],
)
def test_bad_settings_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Settings.from_env(env)


def test_child_processes_see_the_same_settings() -> None:
    settings = Settings.from_env(
        {
            "ALPHAFORGE_API_THREADS": "6",
            "ALPHAFORGE_SSE_MAX_STREAMS_PER_USER": "2",
            "ALPHAFORGE_SSE_HEARTBEAT_S": "1.5",
            "ALPHAFORGE_SSE_SLOT_LEASE_S": "4",
        }
    )
    assert Settings.from_env(settings.child_env()).api == settings.api
