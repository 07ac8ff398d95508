"""The `toa` flow (deployment `synthesize`): servers -> prompts -> sampling per (method, batch)
-> datasets -> summary -> report. It only orchestrates; every step is a task in tasks/.

Failed batches do not stop the others: the flow builds datasets from what finished, publishes
the summary, and then fails naming the failed batches, so Retry in the Prefect UI (or
`prefect flow-run retry`) redoes only the unfinished work (finished batches have done markers,
finished calls are replayed from the record).
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from toa import templates
from toa.config import RunConfig, load_config
from toa.engine import BatchStats, close_engines, done_marker
from toa.reward import build_backend
from toa.storage import Store
from toa.tasks.datasets import build_datasets
from toa.tasks.prompts import load_prompt_batches
from toa.tasks.report import publish_report, record_run, summarize
from toa.tasks.sampling import sample_batch
from toa.tasks.servers import start_endpoints, stop_servers


def resolve(config_file: str | None, overrides: dict[str, Any]) -> RunConfig:
    return load_config(config_file, {k: v for k, v in overrides.items() if v is not None})


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
    run_id = cfg.run_id(extra={"templates": templates.hashes()})
    store = Store(cfg.results_root, cfg.storage_options)
    store.init_tables()  # fails here, before any model call, on a root without write permission
    logger = get_run_logger()
    logger.info("run %s: methods %s, %d agents, n=%d, results in %s", run_id, cfg.methods, len(cfg.agents), cfg.n, cfg.results_root)

    batches = load_prompt_batches(cfg)
    units = [(m, b) for m in cfg.methods for b in batches]
    pending = [u for u in units if not store.exists(*done_marker(run_id, u[0], u[1].key))]
    logger.info("%d of %d (method, batch) units to do", len(pending), len(units))
    try:
        endpoints = {}
        if pending:  # a finished run starts no server at all
            endpoints = start_endpoints(cfg.agents, store.local_dir("logs"))
            record_run(cfg, run_id, endpoints, build_backend(cfg.reward).identity)
        sampler = sample_batch.with_options(retries=cfg.task_retries)
        futures = {f"{m}/{b.key}": sampler.submit(cfg, endpoints, run_id, m, b) for m, b in units}
        stats, failed = _collect(futures)
    finally:
        close_engines()
        stop_servers()
    counts = build_datasets(cfg, run_id, batches[0].source) if batches else {}
    table = summarize(cfg, run_id, stats)
    report = publish_report(cfg, run_id)
    result = {"run_id": run_id, "results_root": cfg.results_root, "summary": table, "datasets": counts,
              "report": report, "failed_batches": failed}
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(futures)} batches failed after retries: {failed}; "
                           "their errors are rows in the samples/calls views; retry this flow run to redo them")
    return result


def _collect(futures: dict) -> tuple[list[BatchStats], list[str]]:
    stats, failed = [], []
    for label, future in futures.items():
        future.wait()
        if future.state.is_completed():
            stats.append(future.result())
        else:
            failed.append(f"{label}: {future.state.message}")
    return stats, failed
