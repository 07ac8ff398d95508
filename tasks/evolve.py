"""Prompt-evolution tasks (toa.evolve): one evolve step after a sampling run, and the record of
which run sampled which prompt set in an evolve loop (`evolve_iterations`)."""

from __future__ import annotations

import time
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from toa.config import RunConfig
from toa.evolve import EvolveConfig, run_step, step_done
from toa.rows import EvolveIterationRow
from toa.servers import Endpoint
from toa.storage import Store
from toa.batches import source_key
from toa.tasks.servers import start_endpoints, stop_servers


def evolve_iteration(run_cfg: RunConfig, cfg: EvolveConfig, eid: str, iteration: int, run_id: str,
                     owner: str) -> dict[str, Any]:
    """One evolve step; the evolving agent's server is started only when the step has work
    left (a finished step reads its manifest), and stopped after it."""
    prompt_source = source_key(run_cfg)
    endpoints = None
    if not step_done(Store(run_cfg.results_root, run_cfg.storage_options), eid, iteration, run_id):
        alias = cfg.agent or run_cfg.agents[0].alias
        agents = [a for a in run_cfg.agents if a.alias == alias]
        if not agents:
            raise ValueError(f"evolve agent {alias!r} is not one of the agents {[a.alias for a in run_cfg.agents]}")
        endpoints = start_endpoints(run_cfg, owner, agents)
    try:
        return evolve_step(run_cfg, cfg, eid, iteration, run_id, prompt_source, endpoints)
    finally:
        stop_servers(owner)


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
    row = EvolveIterationRow(evolve_id=evolve_id, iteration=iteration, run_id=run_id, prompts_path=prompts_path,
                             prompts=step["prompts"], evolved=step["evolved"], selected=step["selected"],
                             created_at=time.time())
    # one shard per (loop, iteration): a rerun overwrites it instead of adding a row
    store.write_rows("evolve_iterations", [row], f"evolve={evolve_id}", f"iter={iteration}.parquet")
