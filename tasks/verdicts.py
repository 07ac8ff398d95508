"""Verdict task: correctness of every generation of a verifiable prompt source (toa.verdicts),
written as the `verdicts` table that the accuracy views (sql/accuracy.sql) read."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from toa.config import RunConfig
from toa.storage import Store
from toa.verdicts import write_verdicts


def wants_verdicts(cfg: RunConfig) -> bool:
    """A source with gold answers (a preset or answer_format), or a run scored by the verifier."""
    return cfg.prompts.verifiable or cfg.reward.kind == "math"


@task(name="judge-samples", cache_policy=NO_CACHE)
def judge_samples(cfg: RunConfig, run_id: str, prompt_source: str) -> int:
    count = write_verdicts(Store(cfg.results_root, cfg.storage_options), run_id, prompt_source)
    get_run_logger().info("run %s: %d verdicts (views accuracy_at_budget, accuracy_summary)", run_id, count)
    return count
