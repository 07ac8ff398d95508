"""The sampling task: one Prefect task per (method, batch).

The work is toa.engine.run_batch (plain Python). A batch with failed calls or rewards writes
everything it has (errors as rows) and then fails, so Prefect retries it; the retry replays the
recorded calls and makes only the failed ones again.

On Dask, a worker process that dies mid-batch is not a failure Prefect sees: the scheduler runs
the task again on another worker, where the batch's first shard writers take in the dead
worker's call and reward journals (toa.storage.ShardWriter.recover) before its record is read,
so only the calls it had in flight are made again (tests/test_worker_death.py). A task the
scheduler gives up on is named by toa.runners.lost_on_cluster.
"""

from __future__ import annotations

import functools

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from toa.tasks.progress import prompt_done
from toa.tasks.prompts import read_batch

from toa import stopping
from toa.batches import BatchRef
from toa.engine import run_batch
from toa.plan import RunPlan
from toa.servers import Endpoint
from toa.storage import Store
from toa.units import BatchStats


class BatchFailed(RuntimeError):
    """Some calls, rewards or method runs of a batch failed; they are recorded as rows."""


def _retry_unless_stopping(task, task_run, state) -> bool:
    """A run that is stopping retries nothing: its batches resume on the next run."""
    return not stopping.requested()


@task(name="sample-batch", cache_policy=NO_CACHE, retry_delay_seconds=[5, 30, 60],
      retry_condition_fn=_retry_unless_stopping, task_run_name="{method}-{batch.key}")
def sample_batch(plan: RunPlan, endpoints: dict[str, Endpoint], method: str, batch: BatchRef,
                 owner: str = "") -> BatchStats:
    prompts = read_batch(Store(plan.cfg.results_root, plan.cfg.storage_options), batch)
    stats = run_batch(plan, endpoints, method, batch.key, prompts, owner, functools.partial(prompt_done, plan.run_id))
    logger = get_run_logger()
    if stats.skipped:
        logger.info("%s batch %s already done: skipped", method, batch.key)
        return stats
    logger.info("%s batch %s: %d prompts, %d samples, %d new calls, %d replayed, %d failed calls, "
                "%d reward errors, %d method errors in %.1fs", method, batch.key, stats.prompts,
                stats.samples, stats.calls_made, stats.cached, stats.calls_failed, stats.reward_errors,
                stats.method_errors, stats.seconds)
    if stats.failed:
        raise BatchFailed(f"{method} batch {batch.key}: {stats.calls_failed} failed calls, "
                          f"{stats.reward_errors} reward errors, {stats.method_errors} method errors "
                          "(recorded in the samples and calls views)")
    return stats
