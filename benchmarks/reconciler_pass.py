"""What the reconciler's candidate query costs on a large shard table: the frequent pass (running shards whose lease
expired, every ``ALPHAFORGE_RECONCILE_INTERVAL``) and the full one (queued shards past the grace too).

    .venv/bin/python -m benchmarks.reconciler_pass [--finished-jobs 800] [--active-jobs 10]

An embedded PostgreSQL of its own, migrated; ``finished-jobs`` x 500 finished shards (history), and ``active-jobs``
active jobs with 500 queued and 4 running shards each (leases live). Prints each query's plan (EXPLAIN ANALYZE,
after one warm-up) and the median of 20 runs. The frequent pass should be an index scan of ``ix_job_shards_status``
on ``running`` rows, whatever the size of the history (shared/jobs/reconciler.py ``find_candidates``; migration 0014
says why there is no index on ``lease_expires_at``).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from sqlalchemy import Engine, text
from sqlalchemy.dialects import postgresql

from shared.infra import dbadmin, migrate
from shared.infra.db import make_engine
from shared.jobs import reconciler
from shared.ops.embedded import EmbeddedPostgres

KINDS = ["calculation", "backtest", "optimization"]


def seed(engine: Engine, finished_jobs: int, active_jobs: int) -> None:
    jobs = finished_jobs + active_jobs
    with engine.begin() as conn:
        conn.execute(
            text(
                """
                INSERT INTO jobs (id, kind, status, queue, column_name, script, script_sha256, symbols, symbols_sha256,
                                  params, shard_size, shards_total, shards_done, shards_failed, symbols_total,
                                  symbols_done, symbols_failed)
                SELECT ('00000000-0000-0000-0000-' || lpad(g::text, 12, '0'))::uuid, 'calculation',
                       CASE WHEN g <= :active THEN 'running' ELSE 'succeeded' END, 'interactive', 'c', 'result = 1',
                       'x', '{}', 'x', '{}', 5, 500, 0, 0, 0, 0, 0
                FROM generate_series(1, :jobs) g
                """
            ),
            {"active": active_jobs, "jobs": jobs},
        )
        conn.execute(
            text(
                """
                INSERT INTO job_shards (job_id, index, symbols, status, task_id, attempts, lease_holder,
                                        lease_expires_at)
                SELECT ('00000000-0000-0000-0000-' || lpad(j::text, 12, '0'))::uuid, i, '{A,B,C,D,E}',
                       CASE WHEN j > :active THEN 'succeeded' WHEN i < 4 THEN 'running' ELSE 'queued' END,
                       md5(j::text || '-' || i::text), 1,
                       CASE WHEN j <= :active AND i < 4 THEN 'bench pid 1' END,
                       CASE WHEN j <= :active AND i < 4 THEN now() + interval '1 hour' END
                FROM generate_series(1, :jobs) j, generate_series(0, 503) i
                WHERE j <= :active OR i < 500
                """
            ),
            {"active": active_jobs, "jobs": jobs},
        )
        conn.execute(text("ANALYZE"))


def candidate_sql(*, queued: bool) -> str:
    """The SELECT ``find_candidates`` sends, with its parameters inlined."""
    query = reconciler.candidate_query(grace_s=120, kinds=KINDS, limit=5000, queued=queued)
    return str(query.compile(dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--finished-jobs", type=int, default=800)
    parser.add_argument("--active-jobs", type=int, default=10)
    args = parser.parse_args()
    data_dir = Path(tempfile.mkdtemp(prefix="af-bench-reconciler-", dir="/tmp"))
    server = EmbeddedPostgres(data_dir)
    try:
        database_url = dbadmin.create_database(server.start(), "bench_reconciler")
        migrate.upgrade(database_url)
        engine = make_engine(database_url)
        seed(engine, args.finished_jobs, args.active_jobs)
        print(f"{args.finished_jobs * 500:,} finished shards; {args.active_jobs} active jobs with 500 queued and 4 "
              "running shards each (live leases)")  # fmt: skip
        for queued in (False, True):
            sql = candidate_sql(queued=queued)
            with engine.connect() as conn:
                conn.execute(text(sql)).all()
                plan = [row[0] for row in conn.execute(text(f"EXPLAIN ANALYZE {sql}")).all()]
                times = []
                for _ in range(20):
                    started = time.perf_counter()
                    conn.execute(text(sql)).all()
                    times.append((time.perf_counter() - started) * 1000)
            name = "full pass (queued shards too)" if queued else "frequent pass (expired leases)"
            print(f"\n--- {name}: median {statistics.median(times):.2f} ms over 20 runs")
            print("\n".join(plan))
        engine.dispose()
    finally:
        server.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
