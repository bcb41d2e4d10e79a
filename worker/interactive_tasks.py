"""The interactive run task: one ``/try`` or ``/api/security/execute`` run, on the sandbox queue."""

from __future__ import annotations

from typing import Any

from celery import shared_task

from shared.contract import TASK_RUN_INTERACTIVE
from shared.infra.models import JobKind
from shared.jobs import interactive
from worker.tasks import ServicesTask, run_shard_task


@shared_task(bind=True, base=ServicesTask, name=TASK_RUN_INTERACTIVE, acks_late=True, max_retries=None)
def run_interactive(self: Any, shard_id: int) -> str:
    return run_shard_task(
        self,
        JobKind.INTERACTIVE.value,
        shard_id,
        lambda services: interactive.run_interactive(
            services.session_factory,
            shard_id,
            limits=services.settings.sandbox,
            events=services.events,
            quotas=services.settings.quotas,
        ),
    )
