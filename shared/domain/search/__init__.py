"""Parameter search on plain data (no database): the spec, its combos, scoring and ranking, walk-forward windows
and slices, and the artifacts' bytes. ``shared.jobs.optimizations`` runs it as a job."""
