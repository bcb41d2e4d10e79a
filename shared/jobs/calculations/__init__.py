"""Calculation jobs: a user's script computed over each symbol's daily bars (a screener's custom column).

submit.py writes the job and its symbol shards; shard.py is what a worker runs for one shard. Views read the job's
result rows (``pipeline.page_results``): there is nothing to finalize beyond what the pipeline does.
"""

from shared.jobs.calculations.shard import run_shard
from shared.jobs.calculations.submit import CalculationRequest, check_script, submit_calculation, symbols_sha256

__all__ = ["CalculationRequest", "check_script", "run_shard", "submit_calculation", "symbols_sha256"]
