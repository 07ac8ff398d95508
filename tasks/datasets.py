"""Dataset assembly task: SFT and DPO per method from the stored samples, as Parquet shards
(views `sft`, `dpo`), and the JSONL files trainers read under
<root>/exports/run=<id>/<method>/ (./toa-exports/ when the results root is remote).

Per batch, not per run: every SFT/DPO rule looks at one prompt's samples at a time, so building
batch by batch gives the same rows while the memory held stays one batch, whatever the prompt
count (benchmarks/throughput.py measures it at 10k and 100k prompts). The JSONL lines are
appended batch by batch for the same reason; `toa export` makes the other formats on demand.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
from prefect import task
from prefect.cache_policies import NO_CACHE
from toa.batches import BatchRef

from toa.datasets import dpo_jsonl, sft_jsonl
from toa.exports import dataset_card
from toa.plan import RunPlan
from toa.storage import Store


@task(name="build-datasets", cache_policy=NO_CACHE)
def build_datasets(plan: RunPlan, batches: list[BatchRef]) -> dict[str, dict[str, int]]:
    cfg, run_id = plan.cfg, plan.run_id
    store = Store(cfg.results_root, cfg.storage_options)
    out_dir = Path(store.local_dir("exports", f"run={run_id}"))
    counts = {}
    for method in cfg.methods:
        folder = out_dir / method
        folder.mkdir(parents=True, exist_ok=True)
        counts[method] = {"sft": 0, "dpo": 0}
        with (folder / "sft.jsonl").open("w", encoding="utf-8") as sft_out, \
                (folder / "dpo.jsonl").open("w", encoding="utf-8") as dpo_out:
            for batch in batches:
                sft, dpo = _build_batch(plan, store, method, batch)
                sft_out.write(sft_jsonl(sft))
                dpo_out.write(dpo_jsonl(dpo))
                counts[method]["sft"] += sft.height
                counts[method]["dpo"] += dpo.height
        (folder / "README.md").write_text(dataset_card(run_id, [method], counts, cfg.model_dump(mode="json")), encoding="utf-8")
    return counts


def _build_batch(plan: RunPlan, store: Store, method: str, batch: BatchRef) -> tuple[pl.DataFrame, pl.DataFrame]:
    """One batch's SFT and DPO rows by the method's own rule (best vs ranked; Optima: best
    dialogue and branch-point pairs), written as its shards (a rebuild overwrites them)."""
    run_id, shard = plan.run_id, f"{batch.key}.parquet"
    samples = store.read("samples", f"run={run_id}", f"method={method}", shard)
    prompts = store.read("prompts", f"source={batch.source}", shard)
    sft, dpo = plan.methods[method].datasets(samples, prompts, lambda table: store.read(table, f"run={run_id}", f"method={method}", shard),
                                             plan.cfg.rejected_rank)
    store.write_frame(sft, store.path("sft", f"run={run_id}", f"method={method}", shard))
    store.write_frame(dpo, store.path("dpo", f"run={run_id}", f"method={method}", shard))
    return sft, dpo
