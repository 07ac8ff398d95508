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

from typing import Any

from prefect import flow, get_run_logger
from prefect.context import FlowRunContext
from prefect.futures import as_completed
from prefect.states import Cancelled
from toa.tasks.datasets import build_datasets
from toa.tasks.logs import route_toa_logs
from toa.tasks.progress import RunProgress
from toa.tasks.prompts import load_prompt_batches
from toa.tasks.report import publish_report, record_run, summarize
from toa.tasks.sampling import sample_batch
from toa.tasks.servers import start_endpoints, stop_servers
from toa.tasks.verdicts import judge_samples, wants_verdicts

from toa import stopping, templates
from toa.config import RunConfig, load_config, place_servers
from toa.engine import BatchStats, cancel_all_work, close_engines, done_marker
from toa.preflight import check_inputs
from toa.limits import require_shared_api
from toa.reward import build_backend
from toa.runners import (
    TaskRunnerConfig,
    api_for_workers,
    build_task_runner,
    close_worker_engines,
    shared_results_root,
)
from toa.storage import Store


def resolve(config_file: str | None, overrides: dict[str, Any]) -> RunConfig:
    from toa.blocks.resolve import resolve_blocks

    # blocks (reward.block, results_block) are resolved before the fingerprint is taken
    cfg = resolve_blocks(load_config(config_file, {k: v for k, v in overrides.items() if v is not None}))
    return place_servers(cfg)


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
    """Synthesize SFT and DPO data. Parameters override the run file (`config_file`), which
    overrides TOA_* environment variables' defaults; `overrides` takes dotted keys
    (e.g. {"reward.kind": "math", "agents": [...]})."""
    cfg = resolve(config_file, {"methods": methods, "n": n, "seed": seed, "prompts.path": prompts_path,
                                "prompts.limit": limit, "results_root": results_root, **(overrides or {})})
    check_inputs(cfg)  # a missing prompt file or model folder: one clear error before anything starts
    run_id = cfg.run_id(extra={"templates": templates.hashes(), **_method_fingerprints(cfg)})
    store = Store(cfg.results_root, cfg.storage_options)
    store.init_tables()  # fails here, before any model call, on a root without write permission
    require_shared_api(cfg.agents)  # global limits need a Prefect API every worker shares
    logger = get_run_logger()
    logger.info("run %s: methods %s, %d agents, n=%d, results in %s", run_id, cfg.methods, len(cfg.agents), cfg.n, cfg.results_root)

    batches = load_prompt_batches(cfg)
    units = [(m, b) for m in cfg.methods for b in batches]
    pending = [u for u in units if not store.exists(*done_marker(run_id, u[0], u[1].key))]
    logger.info("%d of %d (method, batch) units to do", len(pending), len(units))
    finished = _finished_result(store, run_id, len(units)) if not pending else None
    if finished is not None:  # same config, same prompt file, every unit done: nothing to redo
        logger.info("run %s is complete: returning its recorded result", run_id)
        return finished
    try:
        endpoints = {}
        if pending:  # a finished run starts no server at all
            endpoints = start_endpoints(cfg.agents, store.local_dir("logs"))
            record_run(cfg, run_id, endpoints, build_backend(cfg.reward).identity)
        # a finished run only reads done markers: no cluster is started for that
        runner = build_task_runner(cfg.task_runner if pending else TaskRunnerConfig())
        sampling = sample_units.with_options(task_runner=runner,
                                             flow_run_name=f"sampling-{run_id}")
        with route_toa_logs():  # the engine's watchdog warnings, into this flow run's logs
            state = sampling(cfg, endpoints, run_id, units, return_state=True)
        stats, failed = state.result() if not state.is_cancelled() else ([], [])
    except stopping.Stopped:
        pass  # ended below as Cancelled, after the servers are stopped
    finally:
        close_engines()
        stop_servers()
    if stopping.requested():
        return _cancelled(store, run_id, units)
    counts = build_datasets(cfg, run_id, batches)
    if batches and wants_verdicts(cfg):  # gold answers: judge every sample (accuracy views)
        judge_samples(cfg, run_id, batches[0].source)
    table = summarize(cfg, run_id, stats)
    report = publish_report(cfg, run_id)
    result = {"run_id": run_id, "results_root": cfg.results_root, "summary": table, "datasets": counts,
              "report": report, "failed_batches": failed}
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(units)} batches failed after retries: {failed}; "
                           "their errors are rows in the samples/calls views; retry this flow run to redo them")
    store.write_json({**result, "units": len(units)}, *_result_marker(run_id))
    return result


def _cancelled(store: Store, run_id: str, units: list):
    """The truthful end of a stopped run: Cancelled, saying what is kept."""
    done = sum(store.exists(*done_marker(run_id, m, b.key)) for m, b in units)
    message = (f"run {run_id} stopped ({stopping.reason()}): {done} of {len(units)} (method, batch) units "
               "done, every finished call recorded; run the same command again to resume")
    get_run_logger().warning(message)
    return Cancelled(message=message)


def _result_marker(run_id: str) -> tuple[str, ...]:
    return ("runs", f"run={run_id}", "result.json")  # beside the run records, not among done markers


def _finished_result(store: Store, run_id: str, units: int) -> dict[str, Any] | None:
    """The recorded result of a complete run, so that rerunning it costs a few file checks
    (no sampling subflow, dataset rebuild or report); its summary now counts no new calls."""
    if not store.exists(*_result_marker(run_id)):
        return None
    recorded = store.read_json(*_result_marker(run_id))
    if recorded.pop("units", None) != units:  # e.g. the prompt file grew: not the same work
        return None
    for row in recorded["summary"]:
        row["new_calls"], row["replayed"] = 0, row.get("new_calls", 0) + row.get("replayed", 0)
    return recorded


def _method_fingerprints(cfg: RunConfig) -> dict[str, Any]:
    """What a method adds to the run id beyond the config (Optima: its own template files);
    empty for methods without a `fingerprint()`, so their run ids do not change."""
    from toa.methods import get_method

    own = {m: get_method(m, **cfg.method_options.get(m, {})) for m in cfg.methods}
    found = {m: obj.fingerprint() for m, obj in own.items() if hasattr(obj, "fingerprint")}
    return {"method_fingerprints": found} if found else {}


@flow(name="toa-sampling", validate_parameters=False)
def sample_units(cfg: RunConfig, endpoints: dict, run_id: str, units: list) -> tuple[list[BatchStats], list[str]]:
    """Every (method, batch) task, on the task runner the run asks for (`task_runner`): a
    subflow, so the runner (threads here, or a Dask cluster) is chosen per run while the code
    path stays the same. Worker processes get the results root as an absolute path."""
    cfg = cfg.model_copy(update={"results_root": shared_results_root(cfg.results_root)})
    sampler = sample_batch.with_options(retries=cfg.task_retries)
    runner = FlowRunContext.get().task_runner
    try:
        with api_for_workers(runner):
            futures = {(m, b.key): sampler.submit(cfg, endpoints, run_id, m, b) for m, b in units}
        result = _collect(futures, RunProgress(run_id, units))
        if stopping.requested():
            return Cancelled(message=f"stopped ({stopping.reason()})")
        return result
    except BaseException:
        # KeyboardInterrupt, Prefect's SIGTERM (a cancelled deployment run), a bug: the runner
        # would wait for every running batch before letting the exception through; end them now.
        cancel_all_work()
        raise
    finally:
        # Dask workers (of an existing cluster especially) outlive the run: close their engines
        closed = close_worker_engines(runner)
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
                failed.append(f"{method}/{batch}: {future.state.message}")
                progress.finished(method, batch, None, future.state.message)
    finally:
        progress.close()
    return stats, failed
