"""What the end-to-end benchmarks share: real servers, a fresh migrated database, the system's processes.

Embedded PostgreSQL and Redis are started unless ALPHAFORGE_BENCH_DATABASE_URL / ALPHAFORGE_BENCH_REDIS_URL
name servers; each run works in its own database, dropped at the end with every process it started.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from shared.infra import dbadmin, migrate
from shared.marketdata.series import COLUMNS
from shared.ops.embedded import EmbeddedServers

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class BenchStack:
    work: Path  # scratch folder: data dir of the processes and their log
    redis_url: str
    database_url: str
    children: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def spawn(self, command: Sequence[str], env: Mapping[str, str]) -> subprocess.Popen[bytes]:
        """Start one of the system's processes (in its own process group, output to ``processes.log``)."""
        with open(self.work / "processes.log", "ab") as log:
            proc = subprocess.Popen(list(command), cwd=ROOT, env=dict(env), stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)  # fmt: skip
        self.children.append(proc)
        return proc


def stop_process(proc: subprocess.Popen[bytes], timeout_s: float = 30) -> None:
    """TERM the process group, then KILL it if it has not stopped within ``timeout_s``."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@contextlib.contextmanager
def bench_stack(prefix: str) -> Iterator[BenchStack]:
    work = Path(tempfile.mkdtemp(prefix=f"af-{prefix}-", dir="/tmp"))  # short: PostgreSQL's socket path
    servers = EmbeddedServers(work)
    server_url, redis_url = servers.start(
        database_url=os.environ.get("ALPHAFORGE_BENCH_DATABASE_URL"),
        redis_url=os.environ.get("ALPHAFORGE_BENCH_REDIS_URL"),
    )
    db_name = f"af_{prefix}_{secrets.token_hex(4)}"
    stack = BenchStack(work, redis_url, dbadmin.create_database(server_url, db_name))
    try:
        migrate.upgrade(stack.database_url)
        yield stack
    finally:
        for child in stack.children:
            stop_process(child)
        dbadmin.drop_database(server_url, db_name)
        servers.stop()
        shutil.rmtree(work, ignore_errors=True)


def write_parquet(path: Path, universe: Mapping[str, Any], *, dates: bool = False) -> None:
    """The bars of ``universe`` (per symbol, anything with ``ts`` and the five value columns) as one Parquet file,
    sorted by symbol: with ``ts`` (epoch seconds), or, with ``dates``, a ``date`` column as ``bars import`` takes."""
    symbols = sorted(universe)
    ts = np.concatenate([universe[s].ts for s in symbols])
    columns: dict[str, Any] = {"symbol": np.repeat(symbols, [len(universe[s].ts) for s in symbols])}
    columns |= {"date": (ts // 86_400).astype("datetime64[D]")} if dates else {"ts": ts}
    columns |= {name: np.concatenate([getattr(universe[s], name) for s in symbols]) for name in COLUMNS}
    pq.write_table(pa.table(columns), path)
