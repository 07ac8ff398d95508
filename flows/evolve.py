"""The `toa-evolve` flow: EVA-style prompt evolution around the `toa` flow.

    iteration 0: `toa` samples and scores the configured prompt set (a subflow)
    iteration i = 1..k: evolve the prompts of iteration i-1 from its rewards (select the
        informative ones, rewrite them, filter, mix with the old set: toa.evolve), then `toa`
        samples and scores the new set

Each iteration is an ordinary `toa` run (its own run_id, datasets and report), so everything a
run records is there per iteration; `evolve_iterations` says which run sampled which prompt set
and `evolutions` how every evolved prompt came from its parent. A rerun replays everything: the
sampling runs have done markers, the evolve steps manifests, and every call is in the record.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from toa.flows.params import RunParameters, check_declares
from toa.flows.synthesize import toa
from toa.tasks.evolve import evolve_iteration, record_iteration

from toa import templates
from toa.config import RunConfig
from toa.evolve import EvolveConfig
from toa.evolve import evolve_id as make_evolve_id
from toa.plan import resolve
from toa.runlock import hold, lock_path


def next_source(path: str, storage_options: dict[str, Any]) -> dict[str, Any]:
    """The prompt source of an evolved set (the JSONL toa.evolve writes): every field given, so
    nothing of the first source (a preset, a limit, other field names) carries over."""
    return {"path": path, "format": "jsonl", "text_field": "prompt", "id_field": "id",
            "reference_field": "reference", "reference_fallback_field": None, "answer_format": "raw",
            "preset": None, "limit": None, "on_bad_row": "fail", "storage_options": storage_options}


@flow(name="toa-evolve", log_prints=True)
def toa_evolve(
    iterations: int | None = None,
    evolve: dict[str, Any] | None = None,
    config_file: str | None = None,
    methods: list[str] | None = None,
    n: int | None = None,
    seed: int | None = None,
    prompts_path: str | None = None,
    limit: int | None = None,
    results_root: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Sample -> reward -> evolve -> sample again, `iterations` times. `evolve` holds
    toa.evolve.EvolveConfig fields (metric, fraction, evolutions, agent, evolved_share, ...);
    the other parameters are the `toa` flow's (flows/params.RunParameters)."""
    logger = get_run_logger()
    params = RunParameters(config_file=config_file, methods=methods, n=n, seed=seed, prompts_path=prompts_path,
                           limit=limit, results_root=results_root, overrides=overrides)
    base = params.overrides_for_config()
    cfg = EvolveConfig(**{**(evolve or {}), **({"iterations": iterations} if iterations else {})})
    run_cfg = resolve(config_file, base)
    first = toa(config_file=config_file, overrides=base)
    eid = make_evolve_id(first["run_id"], cfg)
    # one process at a time per evolve loop (toa.runlock): its steps' calls are not shared in
    # flight, so a second loop of the same id waits, then replays every step and run
    lock = lock_path(run_cfg.results_root, run_cfg.storage_options, "evolve", f"evolve={eid}", "evolve.lock")
    with hold(lock, f"evolve {eid}", say=logger.warning):
        return _iterate(config_file, base, cfg, run_cfg, eid, first)


def _iterate(config_file: str | None, base: dict[str, Any], cfg: EvolveConfig, run_cfg: RunConfig, eid: str,
             first: dict[str, Any]) -> dict[str, Any]:
    """Iterations 1..k of the loop `eid` after its first run."""
    logger = get_run_logger()
    sampled = max((row["prompts"] for row in first["summary"]), default=0)
    record_iteration(run_cfg, eid, 0, first["run_id"], run_cfg.prompts.path, {"prompts": sampled, "evolved": 0, "selected": 0})
    runs, run_id, step = [first], first["run_id"], None
    for i in range(1, cfg.iterations + 1):
        step = evolve_iteration(run_cfg, cfg, eid, i, run_id, flow_run.id)
        step_overrides = {**base, "prompts": next_source(step["path"], run_cfg.storage_options)}
        result = toa(config_file=config_file, overrides=step_overrides)
        run_cfg, run_id = resolve(config_file, step_overrides), result["run_id"]
        record_iteration(run_cfg, eid, i, run_id, step["path"], step)
        runs.append(result)
        logger.info("evolve %s iteration %d: run %s on %d prompts (%d evolved)", eid, i, run_id,
                    step["prompts"], step["evolved"])
    return {"evolve_id": eid, "results_root": run_cfg.results_root, "run_ids": [r["run_id"] for r in runs],
            "runs": runs, "templates": templates.hashes(templates.EVOLVE_NAMES)}


check_declares(toa_evolve.fn, extra=("iterations", "evolve"))
check_declares(toa.fn)
