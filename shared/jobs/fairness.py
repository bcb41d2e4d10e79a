"""Which shard a worker takes next: interactive before bulk, a user's first job before their others, and the first
shards of every job before the tail of a big one. Celery's own mechanism does it (Redis priority lists), nothing
home-made.

kombu's Redis transport keeps one list per queue and priority (``priority_steps``; 0 is served first) and a
worker's BRPOP names every list of every queue it consumes, priority first (``[p0 of each queue, p1 of each
queue, ...]``): Redis pops the tail of the first non-empty list, so a lower priority always wins and messages of one
priority are first in, first out. A priority is fixed when the message is published. So:

* every interactive shard has a priority in 0..4 and every bulk (nightly) shard one in 5..9: a worker that frees
  a pool slot takes interactive work whenever there is some, and a nightly flood delays a user's job by at most
  the shards already running (one shard's time);
* within a queue a job's shard ``i`` gets ``floor(log2(i + 1))``: each job's first shard is at the top, its next
  two one level down, then four, eight... so a big job's tail waits at the bottom level;
* the level is pushed down by the owner's **other active jobs on that queue** when the job is submitted
  (``owner_load``, counted in the submitting transaction, jobs/pipeline.py): a user's first job starts at level 0,
  their second at 1, and so on. A user who floods with many big jobs therefore has about one shard at level 0 (the
  first shard of their first job), about three at level 1..., whatever the number of jobs: another user's small job,
  at level 0, waits for about one shard per busy user, not one per busy job. (Per-job interleaving alone put the
  first shard of each of a user's eight jobs at level 0, ahead of everyone else.)

Levels are capped at ``LEVELS_PER_QUEUE - 1``: at the bottom level shards are first in, first out.
"""

from __future__ import annotations

from shared.infra.config import QUEUE_BULK

PRIORITY_STEPS = list(range(10))  # one Redis list per priority (kombu's default has only 0, 3, 6, 9)
LEVELS_PER_QUEUE = 5


def shard_level(index: int, owner_load: int = 0) -> int:
    """The level (0 first) within a queue of a job's shard number ``index``, when its owner had ``owner_load``
    other active jobs on that queue at submission."""
    return min(LEVELS_PER_QUEUE - 1, max(0, owner_load) + max(0, index + 1).bit_length() - 1)


def shard_priority(index: int, queue: str | None, owner_load: int = 0) -> int:
    """The Redis priority (0 served first) of a job's shard number ``index`` on ``queue``."""
    return shard_level(index, owner_load) + (LEVELS_PER_QUEUE if queue == QUEUE_BULK else 0)
