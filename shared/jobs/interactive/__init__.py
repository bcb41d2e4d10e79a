"""Interactive runs: a script tried on one symbol (``/api/custom-calculations/try``) or a snippet executed with no
bars (``/api/security/execute``), in the same sandbox as jobs, answered while the request waits.

Each is a job of kind ``interactive`` with one shard and one result (submit.py), on the sandbox queue that every
worker takes before any shard (shared/contract.py); shard.py is what the worker runs; answer.py makes a result
row the endpoint's answer. Being jobs, they have the pipeline's guarantees, and a poll URL when the wait ends.
"""

from shared.jobs.interactive.answer import execute_answer, try_answer
from shared.jobs.interactive.shard import run_interactive
from shared.jobs.interactive.submit import MODE_EXECUTE, MODE_TRY, InteractiveRequest, submit_interactive, wait_final

__all__ = [
    "MODE_EXECUTE",
    "MODE_TRY",
    "InteractiveRequest",
    "execute_answer",
    "run_interactive",
    "submit_interactive",
    "try_answer",
    "wait_final",
]
