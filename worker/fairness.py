"""Which shard a worker takes next: interactive before bulk, and the first shards of every job before the tail
of a big one. Celery's own mechanism does it (Redis priority lists), nothing home-made.

kombu's Redis transport keeps one list per queue and priority (0 is served first) and a worker's BRPOP asks the
priorities in order, across the queues it consumes. So:

* every interactive shard has a priority in 0..4 and every bulk (nightly) shard one in 5..9: a worker that frees
  a pool slot takes interactive work whenever there is some, and a nightly flood delays a user's job by at most
  the shards already running (one shard's time);
* within a queue a job's shard ``i`` gets ``floor(log2(i + 1))`` (capped): each job's first shard is at the top,
  its next two one level down, then four, eight... A 10-symbol job submitted behind a 5,000-symbol one (100
  shards) waits behind the big job's first shard or so, not behind its 99 others: jobs, and so their users, are
  interleaved (a user holds at most ``ALPHAFORGE_MAX_ACTIVE_JOBS`` jobs at the top level).
"""

from __future__ import annotations

from shared.config import QUEUE_BULK

PRIORITY_STEPS = list(range(10))  # one Redis list per priority (kombu's default has only 0, 3, 6, 9)
LEVELS_PER_QUEUE = 5


def shard_priority(index: int, queue: str | None) -> int:
    """The Redis priority (0 served first) of a job's shard number ``index`` on ``queue``."""
    level = min(LEVELS_PER_QUEUE - 1, max(0, index + 1).bit_length() - 1)
    return level + (LEVELS_PER_QUEUE if queue == QUEUE_BULK else 0)
