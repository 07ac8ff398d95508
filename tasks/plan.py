"""Run planning tasks: the resolved config and its plan (toa.plan), what is done and what is
left, and the run's end (its result marker, or the truthful Cancelled of a stopped run).

What a finished unit is, is toa.units.completed's to say (its done marker); the flow never
reads storage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from toa.flows.params import RunParameters

from toa import stopping
from toa.batches import BatchRef
from toa.db import create_views
from toa.engine import started_ahead
from toa.limits import require_shared_api
from toa.plan import RunPlan, plan_run, resolve
from toa.preflight import check_inputs
from toa.storage import Store
from toa.units import (
    BatchStats,
    check_result,
    completed,
    set_aside_changed,
    unit_states,
    write_result,
)


@task(name="plan-run", cache_policy=NO_CACHE)
def prepare_run(params: RunParameters) -> RunPlan:
    """The plan, after the checks that can fail before anything starts: inputs (a missing
    prompt file or model folder), a writable results root, a shared API for global limits."""
    cfg = resolve(params.config_file, params.overrides_for_config())
    check_inputs(cfg)
    plan = plan_run(cfg)
    store = Store(cfg.results_root, cfg.storage_options)
    # shards of a recorded result changed by hand would fail the views: set aside, then remade
    changed = set_aside_changed(store, plan.run_id, busy=lambda method, batch: started_ahead(plan.run_id, method, batch))
    if changed:
        get_run_logger().warning("run %s: set aside %d shard(s) changed since its result was recorded, to be "
                                 "made again: %s (kept as <name>.changed-<time>)", plan.run_id, len(changed),
                                 ", ".join(changed))
    # tables and views: fails here, before any model call, on a root without write permission
    create_views(store)
    require_shared_api(cfg.agents)  # global limits need a Prefect API every worker shares
    get_run_logger().info("run %s: methods %s, %d agents, n=%d, results in %s", plan.run_id, cfg.methods,
                          len(cfg.agents), cfg.n, cfg.results_root)
    return plan


@dataclass(frozen=True)
class Work:
    units: list[tuple[str, BatchRef]]  # every (method, batch) of the run
    pending: list[tuple[str, BatchRef]]  # those not finished
    done: list[BatchStats]  # the finished ones, counted as replayed
    finished: dict[str, Any] | None  # the recorded result when the whole run is done


@task(name="find-work", cache_policy=NO_CACHE)
def find_work(plan: RunPlan, batches: list[BatchRef]) -> Work:
    # a unit the CLI began ahead of the flow (toa.head_start) is the flow's to adopt and count
    states = [(m, b, None if started_ahead(plan.run_id, m, b.key) else done) for m, b, done in unit_states(plan, batches)]
    units = [(m, b) for m, b, _ in states]
    pending = [(m, b) for m, b, done in states if done is None]
    get_run_logger().info("%d of %d (method, batch) units to do", len(pending), len(units))
    # the CLI's rerun shortcut (cli._finished_run) and this check are one rule (units.check_result)
    check = check_result(plan, states)
    if check.result is not None:
        get_run_logger().info("run %s is complete: returning its recorded result", plan.run_id)
    elif check.why:
        get_run_logger().info(check.why)
    return Work(units, pending, [done for _, _, done in states if done is not None], check.result)


@task(name="finish-run", cache_policy=NO_CACHE)
def finish_run(plan: RunPlan, result: dict[str, Any], units: int) -> dict[str, Any]:
    """Record the result of a run whose every unit finished, with the shards it rests on (the
    rerun shortcut: units.write_result), or fail naming the failed batches so that a retry of
    the flow run redoes only them."""
    failed = result["failed_batches"]
    if failed:
        raise RuntimeError(f"{len(failed)} of {units} batches failed after retries: {failed}; "
                           "their errors are rows in the samples/calls views; retry this flow run to redo them")
    write_result(plan, result, units)
    return result


@task(name="stopped", cache_policy=NO_CACHE)
def stop_message(plan: RunPlan, units: list[tuple[str, BatchRef]]) -> str:
    """The truthful end of a stopped run (the flow ends Cancelled with it): what is kept."""
    store = Store(plan.cfg.results_root, plan.cfg.storage_options)
    done = sum(completed(store, plan.run_id, m, b.key) is not None for m, b in units)
    message = (f"run {plan.run_id} stopped ({stopping.reason()}): {done} of {len(units)} (method, batch) units "
               "done, every finished call recorded; run the same command again to resume")
    get_run_logger().warning(message)
    return message
