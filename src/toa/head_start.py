"""A head start for `toa run` on attached servers: the first model requests leave while Prefect
is imported and its temporary API starts, instead of after.

Without it, `toa run` spends its first seconds importing Prefect, starting a temporary Prefect
API and entering the flow before any request leaves (README, "Speed", has the figures). With
every agent attached there is no server to wait for, so the CLI starts the run's first
unfinished (method, batch) unit at once, in plain Python (toa.engine.start_ahead). The flow's
sampling task for that unit adopts it: toa.engine.run_batch returns the head start's stats (or
raises its error) instead of starting the unit again, and the flow's engine is the head start's,
so each endpoint keeps one in-flight limit. The unit is recorded like any other; a stop cancels
it; a failure fails the adopting task, which Prefect retries, replaying the recorded calls.

Only the CLI takes a head start (a deployment run has no seconds to win before its flow), and
only when nothing it needs comes from Prefect or a launched server: no launched agent or reward
server, no Prefect block or global limit, tasks on threads in this process.
"""

from __future__ import annotations

from toa.batches import BatchRef, batch_key, source_key
from toa.config import RunConfig
from toa.errors import UserError
from toa.rows import Prompt, SkippedRow


def begin(cfg: RunConfig) -> str | None:
    """Start the first unfinished unit of the run `cfg` (resolved as the flow resolves it, see
    toa.plan.resolve) when the run allows a head start; returns "<method>/<batch>" or None."""
    if not eligible(cfg):
        return None
    from toa.engine import start_ahead
    from toa.identity import verify_attached
    from toa.plan import plan_run
    from toa.prompts import iter_prompts
    from toa.runners import shared_results_root
    from toa.servers.attach import attach, probe
    from toa.storage import Store
    from toa.units import completed

    # the config exactly as the flow hands it to its tasks, so that the flow finds the same
    # engine (toa.engine.get_engine keys engines by config) and the same unit
    cfg = cfg.model_copy(update={"results_root": shared_results_root(cfg.results_root)})
    plan = plan_run(cfg)
    try:
        batch, prompts = _first_batch(cfg, iter_prompts)
        endpoints = {a.alias: attach(a.alias, a.endpoint) for a in cfg.agents}
        for endpoint in endpoints.values():
            probe(endpoint)  # a wrong URL or key: no head start, the flow reports it
        verify_attached(cfg, endpoints, run=plan.run_id)  # a changed model: no head start; the flow refuses it
    except UserError:
        return None
    store = Store(cfg.results_root, cfg.storage_options)
    method = next((m for m in cfg.methods if completed(store, plan.run_id, m, batch.key) is None), None)
    if method is None or not prompts:
        return None
    start_ahead(plan, endpoints, method, batch.key, prompts)
    return f"{method}/{batch.key}"


def eligible(cfg: RunConfig) -> bool:
    """Nothing the first unit needs comes from a launched server, the Prefect API or a cluster."""
    attached = all(a.launch is None and a.endpoint is not None and a.endpoint.api_key_block is None
                   and a.global_limit is None for a in cfg.agents)
    reward = cfg.reward
    reward_ready = not (reward.kind == "vllm" and reward.launch is not None) and reward.block is None
    judge_key = reward.kind != "judge" or reward.endpoint is None or reward.endpoint.api_key_block is None
    return (cfg.head_start and attached and reward_ready and judge_key and cfg.results_block is None
            and cfg.task_runner.kind == "threads")


def _first_batch(cfg: RunConfig, iter_prompts) -> tuple[BatchRef, list[Prompt]]:
    """The first batch as tasks/prompts.py cuts it (bad rows skipped the same way), reading only
    as far as it needs; a bad row in fail mode raises (UserError) and the flow reports it."""
    prompts: list[Prompt] = []
    for item in iter_prompts(cfg.prompts):
        if isinstance(item, SkippedRow):
            continue
        prompts.append(item)
        if len(prompts) == cfg.batch_size:
            break
    return BatchRef(key=batch_key(prompts), source=source_key(cfg), size=len(prompts)), prompts
