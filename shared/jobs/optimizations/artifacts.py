"""An optimisation's artifacts (``optimization.json``, ``results.csv``, ``heatmap.png``:
``shared.domain.search.report``) with their manifest, in the owner's manifest chain
(``shared.jobs.backtests.artifacts``). Files live outside the database: they are built after the transaction that
finalized the optimisation committed (its outcome stored: :mod:`.finalize`), by the worker that finalized it or the
follow-up task, from the stored rows only. Built once: a second call finds the manifest.
"""

from __future__ import annotations

import uuid

from sqlalchemy.orm import Session, sessionmaker

from shared.domain.search import report
from shared.infra.artifact_store import ArtifactStore
from shared.infra.models import RunManifest
from shared.jobs.backtests import artifacts
from shared.jobs.optimizations import read


def build_if_finished(factory: sessionmaker[Session], store: ArtifactStore, job_id: uuid.UUID) -> RunManifest | None:
    """Build the optimisation's artifacts once it is finalized (``jobs.finalized_at``: its outcome is stored); None
    before (or when its finalization failed); the existing manifest if built."""
    with factory() as session:
        existing = artifacts.get_manifest(session, job_id)
        if existing is not None:
            return existing
        job, opt = read.get(session, job_id)
        if job.finalized_at is None:
            return None
        windows = sorted({t.window for t, _ in read.job_tasks(session, job_id)})
        rows = [(w, *read.load_summary(session, job_id, w)) for w in windows]
        files = report.render(
            optimization_id=str(job_id),
            status=job.status,
            spec_hash=opt.spec_hash,
            spec_doc=opt.spec,
            outcome=opt.outcome or {},
            rows=rows,
        )
        owner_id, spec_hash, status = opt.owner_id, opt.spec_hash, job.status
    return artifacts.write_manifest(
        factory, store, job_id=job_id, owner_id=owner_id, config_hash=spec_hash, status=status, files=files
    )
