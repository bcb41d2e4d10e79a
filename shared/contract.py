"""The contract between the API and the workers: task names, queues, the Celery app built from Settings (Flask's Celery
pattern, no module-level app), the shard enqueuer and beat's schedule. api/ and worker/ meet here and nowhere else."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from celery import Celery, group, signals
from celery.schedules import crontab
from kombu import Queue

from shared.infra import log_context
from shared.infra.config import QUEUE_BULK, QUEUE_INTERACTIVE, QUEUE_MAINTENANCE, QUEUE_SANDBOX, Settings
from shared.infra.logs import configure_logging
from shared.jobs.fairness import PRIORITY_STEPS, shard_priority
from shared.jobs.pipeline import Enqueue, ShardTask

TASK_RUN_CALCULATION_SHARD = "alphaforge.calculations.run_shard"
TASK_RUN_INTERACTIVE = "alphaforge.interactive.run"  # one /try or /api/security/execute run, on QUEUE_SANDBOX
BEAT_MAX_LOOP_S = 5  # beat wakes at least this often (and renews its lock)
BEAT_LOCK_TIMEOUT_S = 30  # a beat that stopped renewing for this long is replaced by a waiting one
TASK_RUN_BACKTEST_SHARD = "alphaforge.backtests.run_shard"
TASK_BUILD_RUN_ARTIFACTS = "alphaforge.backtests.build_artifacts"  # finalize + artifacts of one ended, no shard left
TASK_RUN_OPTIMIZATION_SHARD = "alphaforge.optimizations.run_shard"
TASK_FINISH_OPTIMIZATION = "alphaforge.optimizations.finish"  # finalize + artifacts of one ended, no slice left
# Housekeeping, on the maintenance queue; beat's timetable of them is beat_schedule() below.
TASK_RECONCILE_SHARDS = "alphaforge.maintenance.reconcile_shards"
TASK_PRUNE_JOBS = "alphaforge.maintenance.prune_jobs"
TASK_PRUNE_RUNS = "alphaforge.maintenance.prune_runs"
TASK_PRUNE_OPTIMIZATIONS = "alphaforge.maintenance.prune_optimizations"
TASK_NIGHTLY_RUN = "alphaforge.nightly.start_run"
TASK_NIGHTLY_HARVEST = "alphaforge.nightly.harvest"
TASK_WEBHOOK_DISPATCH = "alphaforge.webhooks.dispatch"
TASK_WEBHOOK_DELIVER = "alphaforge.webhooks.deliver"  # one job's first attempt, sent when the job ends
NIGHTLY_TICK_EXPIRES_S = 3600  # a nightly tick no worker took within an hour is dropped, not run late


def shard_time_limit_s(settings: Settings) -> int:
    """Celery's hard backstop: above the longest a shard may take (every symbol hitting the longest time limit a job
    may ask for, plus loading and storing). Beyond it the pool process is killed and the shard retried elsewhere."""
    per_symbol = max(settings.sandbox.symbol_timeout_s, settings.sandbox_bounds.max_timeout_s)
    worst_shard = settings.shard_size * (per_symbol + settings.sandbox.startup_timeout_s)
    return int(worst_shard + 300)


def visibility_timeout_s(settings: Settings) -> int:
    """On Redis a task still unacknowledged after this is delivered again (Celery's Redis caveat): keep it
    well above the longest a shard may take."""
    return max(3600, 2 * shard_time_limit_s(settings))


def create_celery(settings: Settings, *, set_as_current: bool = True) -> Celery:
    """``set_as_current=False``: an extra app of the same config (the API's health checker) that leaves the process's
    current app alone."""
    redis_url = settings.require_redis_url()
    app = Celery(
        "alphaforge",
        broker=redis_url,
        backend=redis_url,
        include=[
            "worker.tasks",
            "worker.sandbox_probe",
            "worker.backtest_tasks",
            "worker.optimization_tasks",
            "worker.interactive_tasks",
        ],
        set_as_current=set_as_current,
    )
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
        # KiB: recycle a pool process that grew past 1.5 GB. A fresh one is already ~450 MB (numpy, the compiled
        # kernels, matplotlib); at 500 MB nearly every shard of a large run replaced it (and a run's validation
        # tasks lost the sleeves they share in the process, reloading every symbol's bars each time).
        worker_max_memory_per_child=1_500_000,
        task_default_queue=QUEUE_INTERACTIVE,
        task_queues=(Queue(QUEUE_SANDBOX), Queue(QUEUE_INTERACTIVE), Queue(QUEUE_BULK)),
        task_routes={
            TASK_RUN_INTERACTIVE: {"queue": QUEUE_SANDBOX},
            TASK_RUN_CALCULATION_SHARD: {"queue": QUEUE_INTERACTIVE},
            TASK_RUN_BACKTEST_SHARD: {"queue": QUEUE_INTERACTIVE},
            TASK_BUILD_RUN_ARTIFACTS: {"queue": QUEUE_INTERACTIVE},
            TASK_RUN_OPTIMIZATION_SHARD: {"queue": QUEUE_INTERACTIVE},
            TASK_FINISH_OPTIMIZATION: {"queue": QUEUE_INTERACTIVE},
        },
        broker_transport_options={"visibility_timeout": visibility_timeout_s(settings)},
        result_backend_transport_options={"visibility_timeout": visibility_timeout_s(settings)},
        broker_connection_retry_on_startup=True,
        # A lost broker connection is retried for ever (Celery's default gives up after 100 tries, ~50 min, and
        # the worker exits): a worker rides out a Redis restart of any length and reconnects.
        broker_connection_retry=True,
        broker_connection_max_retries=None,
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
    # Housekeeping (worker/maintenance_tasks.py): its tasks, its own queue and beat's schedule of them.
    app.conf.imports = ("worker.maintenance_tasks",)
    app.conf.task_queues = (*app.conf.task_queues, Queue(QUEUE_MAINTENANCE))
    app.conf.beat_schedule = beat_schedule(settings)
    # celery-redbeat: the schedule lives in Redis and a lock lets only one beat process fire (a second one waits to
    # take over, within the lock timeout, if the first dies). Crontab entries are read in the exchange's time zone.
    app.conf.beat_scheduler = "worker.beat_scheduler:TolerantRedBeatScheduler"  # redbeat, surviving Redis restarts
    app.conf.redbeat_redis_url = redis_url
    app.conf.redbeat_redis_options = {"socket_timeout": 10.0, "socket_connect_timeout": 5.0}
    app.conf.redbeat_key_prefix = "alphaforge:redbeat:"
    app.conf.redbeat_lock_timeout = BEAT_LOCK_TIMEOUT_S
    app.conf.beat_max_loop_interval = BEAT_MAX_LOOP_S
    app.conf.timezone = settings.maintenance.exchange_timezone
    # Ten Redis priority lists per queue, asked in the order the worker lists its queues (shared/jobs/fairness.py).
    app.conf.broker_transport_options = {
        **app.conf.broker_transport_options,
        "priority_steps": PRIORITY_STEPS,
        "queue_order_strategy": "priority",
    }
    app.conf.alphaforge_settings = settings
    _connect_context_signals(settings)
    return app


# --- request ids and log context across the broker -----------------------------------------------------------


def _add_request_id_header(headers: dict[str, Any] | None = None, **_: Any) -> None:
    """Publishing side (the API): a task sent while handling a request carries that request's id."""
    request_id = log_context.current_request_id()
    if request_id and headers is not None:
        headers.setdefault(log_context.TASK_HEADER_REQUEST_ID, request_id)


def _bind_task_context(task_id: str | None = None, task: Any = None, **_: Any) -> None:
    """Worker side: every log line while the task runs carries its request id, task id and name."""
    request_id = getattr(task.request, log_context.TASK_HEADER_REQUEST_ID, None) if task is not None else None
    log_context.clear()
    log_context.bind(request_id=request_id, task_id=task_id, task_name=getattr(task, "name", None))


def _clear_task_context(**_: Any) -> None:
    log_context.clear()


def _connect_context_signals(settings: Settings) -> None:
    def setup_logging(loglevel: Any = None, **_: Any) -> None:
        # Connected: Celery leaves logging to us (JSON lines, with the task context) in the worker and beat.
        level = loglevel.upper() if isinstance(loglevel, str) else loglevel
        configure_logging("celery", level if isinstance(level, (str, int)) else settings.log_level)

    signals.before_task_publish.connect(_add_request_id_header, weak=False, dispatch_uid="alphaforge-request-id")
    signals.task_prerun.connect(_bind_task_context, weak=False, dispatch_uid="alphaforge-task-context")
    signals.task_postrun.connect(_clear_task_context, weak=False, dispatch_uid="alphaforge-task-context-end")
    signals.setup_logging.connect(setup_logging, weak=False, dispatch_uid="alphaforge-logging")


def shard_enqueuer(app: Celery, task_name: str = TASK_RUN_CALCULATION_SHARD, queue: str | None = None) -> Enqueue:
    """An ``Enqueue`` that publishes one task per shard as a plain group (no chord), on ``queue`` (default: the
    task's route), each with its priority (shared/jobs/fairness.py: interactive first, users and jobs interleaved)."""
    options = {"queue": queue} if queue else {}

    def enqueue(tasks: Sequence[ShardTask]) -> None:
        signatures = [
            app.signature(task_name, args=(t.shard_id,), task_id=t.task_id, priority=priority, **options)
            for priority, t in ((shard_priority(i, queue, t.owner_load), t) for i, t in enumerate(tasks))
        ]
        group(signatures).apply_async()

    return enqueue


# --- Celery beat's schedule --------------------------------------------------------------------------------


def beat_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    """Housekeeping entries. Each tick expires after one interval: if no worker took it by then, the next tick
    replaces it (no pile of stale passes after an outage)."""
    maint = settings.maintenance
    schedule: dict[str, dict[str, Any]] = {
        # Running shards whose lease expired: seconds after a worker dies (shared/jobs/leases.py).
        "reconcile-shards": {
            "task": TASK_RECONCILE_SHARDS,
            "schedule": maint.reconcile_interval_s,
            "kwargs": {"queued": False},
            "options": {"queue": QUEUE_MAINTENANCE, "expires": maint.reconcile_interval_s},
        },
        # Everything, queued shards past the grace too (a queue scan and a worker query when there are some).
        "reconcile-queued-shards": {
            "task": TASK_RECONCILE_SHARDS,
            "schedule": maint.queued_pass_interval_s,
            "options": {"queue": QUEUE_MAINTENANCE, "expires": maint.queued_pass_interval_s},
        },
        "prune-jobs": {
            "task": TASK_PRUNE_JOBS,
            "schedule": maint.retention_interval_s,
            "options": {"queue": QUEUE_MAINTENANCE, "expires": maint.retention_interval_s},
        },
        "prune-runs": {
            "task": TASK_PRUNE_RUNS,
            "schedule": maint.retention_interval_s,
            "options": {"queue": QUEUE_MAINTENANCE, "expires": maint.retention_interval_s},
        },
        "prune-optimizations": {
            "task": TASK_PRUNE_OPTIMIZATIONS,
            "schedule": maint.retention_interval_s,
            "options": {"queue": QUEUE_MAINTENANCE, "expires": maint.retention_interval_s},
        },
        "harvest-nightly": {
            "task": TASK_NIGHTLY_HARVEST,
            "schedule": maint.reconcile_interval_s,
            "options": {"queue": QUEUE_MAINTENANCE, "expires": maint.reconcile_interval_s},
        },
    }
    schedule["webhook-dispatch"] = {
        "task": TASK_WEBHOOK_DISPATCH,
        "schedule": settings.webhooks.poll_interval_s,
        "options": {"queue": QUEUE_MAINTENANCE, "expires": settings.webhooks.poll_interval_s},
    }
    if maint.nightly_schedule != "off":
        minute, hour, day_of_month, month_of_year, day_of_week = maint.nightly_schedule.split(" ")
        schedule["nightly-recalculation"] = {
            "task": TASK_NIGHTLY_RUN,
            # Read in the app's time zone: the exchange's (shared/contract.py sets it).
            "schedule": crontab(minute, hour, day_of_week, day_of_month, month_of_year),
            "options": {"queue": QUEUE_MAINTENANCE, "expires": NIGHTLY_TICK_EXPIRES_S},
        }
    return schedule
