"""The Celery app, built from the same Settings as the API (Flask's Celery pattern, no module-level app)."""

from __future__ import annotations

from collections.abc import Sequence

from celery import Celery, group
from kombu import Queue

from shared.config import QUEUE_BULK, QUEUE_INTERACTIVE, Settings
from shared.jobs import Enqueue, ShardTask

TASK_RUN_CALCULATION_SHARD = "alphaforge.calculations.run_shard"


def shard_time_limit_s(settings: Settings) -> int:
    """Celery's hard backstop: above the longest a shard may take (every symbol hitting its time limit,
    plus loading and storing). Beyond it the pool process is killed and the shard retried elsewhere."""
    worst_shard = settings.shard_size * (settings.sandbox.symbol_timeout_s + settings.sandbox.startup_timeout_s)
    return int(worst_shard + 300)


def visibility_timeout_s(settings: Settings) -> int:
    """On Redis a task still unacknowledged after this is delivered again (Celery's Redis caveat): keep it
    well above the longest a shard may take."""
    return max(3600, 2 * shard_time_limit_s(settings))


def create_celery(settings: Settings) -> Celery:
    redis_url = settings.require_redis_url()
    app = Celery("alphaforge", broker=redis_url, backend=redis_url, include=["worker.tasks"], set_as_current=True)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,  # results live in PostgreSQL
        result_expires=24 * 3600,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_time_limit=shard_time_limit_s(settings),
        worker_max_tasks_per_child=500,  # bound slow leaks in long-lived pool processes
        worker_max_memory_per_child=512_000,  # KiB: recycle a pool process that grew past 500 MB
        task_default_queue=QUEUE_INTERACTIVE,
        task_queues=(Queue(QUEUE_INTERACTIVE), Queue(QUEUE_BULK)),
        task_routes={TASK_RUN_CALCULATION_SHARD: {"queue": QUEUE_INTERACTIVE}},
        broker_transport_options={"visibility_timeout": visibility_timeout_s(settings)},
        result_backend_transport_options={"visibility_timeout": visibility_timeout_s(settings)},
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=settings.enqueue_timeout_s,
        redis_socket_connect_timeout=settings.enqueue_timeout_s,
        redis_socket_timeout=max(settings.enqueue_timeout_s, 5.0),
        task_publish_retry=True,
        task_publish_retry_policy={
            "max_retries": 2,
            "interval_start": 0.2,
            "interval_step": 0.5,
            "interval_max": 1.0,
        },
        worker_send_task_events=True,
        task_send_sent_event=True,
        worker_hijack_root_logger=False,
        enable_utc=True,
    )
    app.conf.alphaforge_settings = settings
    return app


def shard_enqueuer(app: Celery, task_name: str = TASK_RUN_CALCULATION_SHARD) -> Enqueue:
    """An ``Enqueue`` that publishes one task per shard as a plain group (no chord)."""

    def enqueue(tasks: Sequence[ShardTask]) -> None:
        group(app.signature(task_name, args=(t.shard_id,), task_id=t.task_id) for t in tasks).apply_async()

    return enqueue
