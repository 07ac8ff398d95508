"""Prompt-evolution tasks (toa.evolve): one evolve step after a sampling run, and the record of
which run sampled which prompt set in an evolve loop (`evolve_iterations`)."""

from __future__ import annotations

import time
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from toa.config import RunConfig
from toa.evolve import EvolveConfig, run_step
from toa.servers import Endpoint
from toa.storage import Store


@task(name="evolve-prompts", cache_policy=NO_CACHE, task_run_name="evolve-{iteration}")
def evolve_step(run_cfg: RunConfig, cfg: EvolveConfig, evolve_id: str, iteration: int, from_run_id: str,
                prompt_source: str, endpoints: dict[str, Endpoint] | None) -> dict[str, Any]:
    out = run_step(run_cfg, cfg, evolve_id, iteration, from_run_id, prompt_source, endpoints)
    get_run_logger().info("evolve %s iteration %d: %d selected, %d evolved prompts kept of %d rewrites "
                          "(%d rejected), next set %d prompts, %d new calls", evolve_id, iteration, out["selected"],
                          out["evolved"], out["steps"], out["rejected"], out["prompts"], out["calls_made"])
    return out


@task(name="record-iteration", cache_policy=NO_CACHE)
def record_iteration(run_cfg: RunConfig, evolve_id: str, iteration: int, run_id: str, prompts_path: str,
                     step: dict[str, Any]) -> None:
    store = Store(run_cfg.results_root, run_cfg.storage_options)
    row = {"evolve_id": evolve_id, "iteration": iteration, "run_id": run_id, "prompts_path": prompts_path,
           "prompts": step["prompts"], "evolved": step["evolved"], "selected": step["selected"],
           "created_at": time.time()}
    # one shard per (loop, iteration): a rerun overwrites it instead of adding a row
    store.write_rows("evolve_iterations", [row], f"evolve={evolve_id}", f"iter={iteration}.parquet")
