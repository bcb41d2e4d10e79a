"""gunicorn's settings for the API, from the same environment as everything else (``shared.infra.config.Settings``).

One place for them: ``./alphaforge up``, the Dockerfile and docker-compose all run
``gunicorn -c python:api.gunicorn_conf 'api:create_wsgi_app()'``.

Threaded workers (``gthread``): a server-sent events stream holds its thread while the client follows a job, so
sync workers (one request each) would be taken by a couple of streams. ``api.events`` caps the streams per process
below the thread count (``ALPHAFORGE_SSE_MAX_STREAMS``), so that streams never take the threads other requests need.
"""

from __future__ import annotations

from shared.infra.config import Settings

_settings = Settings.from_env()

bind = f"{_settings.api_host}:{_settings.api_port}"
workers = _settings.api.workers
worker_class = "gthread"
threads = _settings.api.threads
# No control socket: its default path (~/.gunicorn/gunicorn.ctl) would be shared by every gunicorn on the machine.
control_socket_disable = True
# No gunicorn access log: the API writes its own, as JSON with the request id.
accesslog = None
# A stream's heartbeat comes every 15 s; a worker that is busy serving threads is not hung.
timeout = 60
graceful_timeout = 20
