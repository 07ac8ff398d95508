"""Run record and report tasks: the `runs` row, the per-method summary table (best and mean
reward, generations, tokens, errors, new model calls) as a Prefect table artifact, and the
run report (plots, Markdown, HTML; toa.report) attached to the flow run."""

from __future__ import annotations

import json
import time

from prefect import task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from toa import templates
from toa.config import RunConfig
from toa.db import create_views, query
from toa.report import build_report, publish_artifacts
from toa.units import BatchStats
from toa.reward.config import build_backend
from toa.servers import Endpoint
from toa.sql import query_text
from toa.rows import RunRecord
from toa.storage import Store


@task(name="record-run", cache_policy=NO_CACHE)
def record_run(cfg: RunConfig, run_id: str, endpoints: dict[str, Endpoint]) -> None:
    store = Store(cfg.results_root, cfg.storage_options)
    reward_id = build_backend(cfg.reward).identity
    started = time.time()
    row = RunRecord(
        run_id=run_id, started_at=started,
        config_json=cfg.model_dump_json(),  # SecretStr fields dump as '**********'
        models_json=json.dumps({"agents": {a: e.identity for a, e in endpoints.items()},
                                "base_urls": {a: e.base_url for a, e in endpoints.items()},
                                # how each launched server computed: "auto" resolved on this machine
                                "launch": {a: {"device": e.device, "dtype": e.dtype, "cpus": e.cpus}
                                           for a, e in endpoints.items() if e.device is not None},
                                "templates": templates.hashes()}),
        reward_id=reward_id,
    )
    store.write_rows("runs", [row], f"run={run_id}", f"{int(started * 1000)}.parquet")
    create_views(store)  # queries (summarize, the report, `toa sql`) then only read the database


@task(name="summarize", cache_policy=NO_CACHE)
def summarize(cfg: RunConfig, run_id: str, stats: list[BatchStats]) -> list[dict]:
    store = Store(cfg.results_root, cfg.storage_options)
    table = query(store, query_text("report_summary"), [run_id]).to_dicts()
    for row in table:
        mine = [s for s in stats if s.method == row["method"]]
        row["new_calls"] = sum(s.calls_made for s in mine)
        row["replayed"] = sum(s.cached for s in mine)
    create_table_artifact(key=f"toa-summary-{run_id}", table=table,
                          description=f"toa run {run_id}: per-method summary at a budget of {cfg.budget} generations per prompt")
    return table


@task(name="publish-report", cache_policy=NO_CACHE)
def publish_report(cfg: RunConfig, run_id: str) -> str:
    store = Store(cfg.results_root, cfg.storage_options)
    out = store.local_dir("reports", f"run={run_id}")
    publish_artifacts(build_report(store, run_id, out), run_id)
    return out
