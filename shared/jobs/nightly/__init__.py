"""Nightly recalculation of saved scripts flagged ``nightly``, and their latest values for screeners.

A run submits every flagged script over its universe as an ordinary calculation job of the script's owner, on the
bulk queue (shared/jobs/fairness.py: interactive work goes first). While a run is not finished no second one starts,
whoever asks (a beat tick, an operator): a transaction-scoped advisory lock serializes the check and the insert of
the run row, and the run row blocks until every one of its jobs finished and was harvested. (celery-redbeat's lock
already keeps a second beat process from firing; this also covers an operator's trigger and a slow run.)

Harvesting copies a finished nightly job's per-symbol results into ``script_latest_values`` (newest wins) and drops
the script's cached copy in Redis, so ``GET /api/custom-calculations/scripts/<id>/latest`` reads one key.

submit.py starts a run; finalize.py harvests its finished jobs; read.py answers screeners.
"""

from shared.jobs.nightly.finalize import harvest
from shared.jobs.nightly.read import cache_key, latest_values
from shared.jobs.nightly.submit import RunStart, start_run

__all__ = ["RunStart", "cache_key", "harvest", "latest_values", "start_run"]
