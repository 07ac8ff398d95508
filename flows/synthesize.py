"""The `toa` flow (deployment `synthesize`): servers -> prompts -> sampling per (method, batch)
-> datasets -> summary -> report. It only orchestrates; every step is a task in tasks/.

Asked to stop (toa.stopping: Ctrl-C or SIGTERM of `toa run`), it stops starting work, lets the
running batches flush what finished, stops the servers and ends Cancelled; a rerun resumes.

Failed batches do not stop the others: the flow builds datasets from what finished, publishes
the summary, and then fails naming the failed batches, so Retry in the Prefect UI (or
`prefect flow-run retry`) redoes only the unfinished work (finished batches have done markers,
finished calls are replayed from the record).
"""

from __future__ import annotations

import functools
from dataclasses import replace
from typing import Any

from prefect import flow, get_run_logger
from prefect.context import FlowRunContext
from prefect.futures import as_completed
from prefect.runtime import flow_run
from prefect.states import Cancelled
from toa.flows.params import RunParameters
from toa.tasks.datasets import build_datasets
from toa.tasks.logs import route_toa_logs
from toa.tasks.plan import find_work, finish_run, prepare_run, stop_message
from toa.tasks.progress import RunProgress
from toa.tasks.prompts import load_prompt_batches
from toa.tasks.report import publish_report, record_run, summarize
from toa.tasks.sampling import sample_batch
from toa.tasks.servers import start_endpoints, stop_servers
from toa.tasks.verdicts import judge_samples, wants_verdicts

from toa import stopping
from toa.engine import cancel_all_work, close_engines
from toa.plan import RunPlan
from toa.runlock import hold_run
from toa.runners import (
    TaskRunnerConfig,
    api_for_workers,
    build_task_runner,
    close_worker_engines,
    lost_on_cluster,
    shared_results_root,
)
from toa.units import BatchStats


@flow(name="toa", log_prints=True)
def toa(
    config_file: str | None = None,
    methods: list[str] | None = None,
    n: int | None = None,
    seed: int | None = None,
    prompts_path: str | None = None,
    limit: int | None = None,
    results_root: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Synthesize SFT and DPO data. Parameters (flows/params.RunParameters) override the run
    file (`config_file`), which overrides TOA_* environment variables' defaults; `overrides`
    takes dotted keys (e.g. {"reward.kind": "math", "agents": [...]})."""
    plan = prepare_run(RunParameters(config_file=config_file, methods=methods, n=n, seed=seed, prompts_path=prompts_path,
                                     limit=limit, results_root=results_root, overrides=overrides))
    # one process at a time per run (toa.runlock): a second run of the same config waits here,
    # then finds its units done; under `toa run` the CLI holds it already (re-entrant)
    with hold_run(plan.cfg.results_root, plan.cfg.storage_options, plan.run_id, say=get_run_logger().warning):
        return _synthesize(plan)


def _synthesize(plan: RunPlan) -> dict[str, Any]:
    """The flow's work once it holds the run: prompts, sampling, datasets, summary, report."""
    batches = load_prompt_batches(plan.cfg)
    work = find_work(plan, batches)
    if work.finished is not None:  # same config, same prompt file, every unit done: nothing to redo
        return work.finished
    owner = flow_run.id  # this run's servers and engines, apart from other runs in this process
    try:
        endpoints = {}
        if work.pending:  # a run with every unit done (its result marker lost) starts no server
            endpoints = start_endpoints(plan.cfg, owner)
            record_run(plan.cfg, plan.run_id, endpoints)
        # a run whose units are all done (its result marker lost) needs no cluster
        runner = build_task_runner(plan.cfg.task_runner if work.pending else TaskRunnerConfig())
        sampling = sample_units.with_options(task_runner=runner, flow_run_name=f"sampling-{plan.run_id}")
        with route_toa_logs():  # the engine's watchdog warnings, into this flow run's logs
            state = sampling(plan, endpoints, work.pending, owner, return_state=True)
        stats, failed = state.result() if not state.is_cancelled() else ([], [])
    except stopping.Stopped:
        pass  # ended below as Cancelled, after the servers are stopped
    finally:
        close_engines(owner)
        stop_servers(owner)
    if stopping.requested():
        return Cancelled(message=stop_message(plan, work.units))
    counts = build_datasets(plan, batches)
    if batches and wants_verdicts(plan.cfg):  # gold answers: judge every sample (accuracy views)
        judge_samples(plan.cfg, plan.run_id, batches[0].source)
    result = {"run_id": plan.run_id, "results_root": plan.cfg.results_root, "summary": summarize(plan.cfg, plan.run_id, work.done + stats),
              "datasets": counts, "report": publish_report(plan.cfg, plan.run_id), "failed_batches": failed}
    return finish_run(plan, result, len(work.units))


@flow(name="toa-sampling", validate_parameters=False)
def sample_units(plan: RunPlan, endpoints: dict, units: list, owner: str) -> tuple[list[BatchStats], list[str]]:
    """Every (method, batch) task still to do, on the task runner the run asks for
    (`task_runner`): a subflow, so the runner (threads here, or a Dask cluster) is chosen per
    run while the code path stays the same."""
    # worker processes (whose working directory may differ) get the results root as an absolute path
    plan = replace(plan, cfg=plan.cfg.model_copy(update={"results_root": shared_results_root(plan.cfg.results_root)}))
    sampler = sample_batch.with_options(retries=plan.cfg.task_retries)
    runner = FlowRunContext.get().task_runner
    try:
        with api_for_workers(runner):
            futures = {(m, b.key): sampler.submit(plan, endpoints, m, b, owner) for m, b in units}
        result = _collect(futures, RunProgress(plan.run_id, units))
        if stopping.requested():
            return Cancelled(message=f"stopped ({stopping.reason()})")
        return result
    except BaseException:
        # KeyboardInterrupt, Prefect's SIGTERM (a cancelled deployment run), a bug: the runner
        # would wait for every running batch before letting the exception through; end them now.
        cancel_all_work(owner)
        raise
    finally:
        # Dask workers (of an existing cluster especially) outlive the run: close their engines
        closed = close_worker_engines(runner, functools.partial(close_engines, owner))
        if closed:
            get_run_logger().info("engines closed in Dask workers: %s", closed)


def _collect(futures: dict, progress: RunProgress) -> tuple[list[BatchStats], list[str]]:
    """Results in completion order, so progress (artifact, events, the CLI bar) moves as
    batches finish rather than in submission order."""
    stats, failed = [], []
    units = {future: unit for unit, future in futures.items()}
    try:
        for future in as_completed(list(futures.values())):
            method, batch = units[future]
            future.wait()  # sets the final state; without it `state` asks the API, which may lag
            if future.state.is_completed():
                stats.append(future.result())
                progress.finished(method, batch, stats[-1])
            else:
                state = future.state
                why = state.message if state.is_final() else (lost_on_cluster(future) or state.message)
                failed.append(f"{method}/{batch}: {why}")
                progress.finished(method, batch, None, why)
    finally:
        progress.close()
    return stats, failed
