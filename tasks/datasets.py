"""Dataset assembly task: SFT and DPO per method from the stored samples, as Parquet shards
(views `sft`, `dpo`), then the JSONL files trainers read (toa.exports) under
<root>/exports/run=<id>/<method>/ (./toa-exports/ when the results root is remote)."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from toa.config import RunConfig
from toa.datasets import build_dpo, build_sft
from toa.exports import export_run
from toa.storage import Store


@task(name="build-datasets", cache_policy=NO_CACHE)
def build_datasets(cfg: RunConfig, run_id: str, prompt_source: str) -> dict[str, dict[str, int]]:
    store = Store(cfg.results_root, cfg.storage_options)
    samples = store.read("samples", f"run={run_id}")
    prompts = store.read("prompts", f"source={prompt_source}")
    counts = {}
    for method in cfg.methods:
        mine = samples.filter(samples["method"] == method)
        sft, dpo = build_sft(mine, prompts), build_dpo(mine, prompts, cfg.rejected_rank)
        store.write_frame(sft, store.path("sft", f"run={run_id}", f"{method}.parquet"))
        store.write_frame(dpo, store.path("dpo", f"run={run_id}", f"{method}.parquet"))
        counts[method] = {"sft": sft.height, "dpo": dpo.height}
    export_run(store, run_id, store.local_dir("exports", f"run={run_id}"), formats=("jsonl",))
    return counts
