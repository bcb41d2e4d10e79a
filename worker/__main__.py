"""``python -m worker worker|beat|flower [celery options]``: Celery commands on the app built from the environment."""

from __future__ import annotations

import sys

from shared.contract import create_celery
from shared.infra.config import QUEUE_BULK, QUEUE_INTERACTIVE, QUEUE_MAINTENANCE, QUEUE_SANDBOX, Settings


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    command = args.pop(0) if args else "worker"
    settings = Settings.from_env()
    app = create_celery(settings)
    if command == "worker":
        defaults = [
            "--loglevel=INFO",
            f"--concurrency={settings.worker_concurrency}",
            f"--queues={QUEUE_SANDBOX},{QUEUE_INTERACTIVE},{QUEUE_BULK},{QUEUE_MAINTENANCE}",  # in this order
            "--without-gossip",
            "--without-mingle",
        ]
        app.worker_main(["worker", *defaults, *args])
    else:
        app.start([command, *args])


if __name__ == "__main__":
    main()
