"""Prompt loading task: stream the source once into prompt shards, one per batch.

The shards (and the skipped rows) are keyed by the source's identity, its size and
modification time, and the batch size, so a rerun on an unchanged file reuses them instead of
reading the source again. Batches are what the sampling tasks receive: a small reference, not
the prompts themselves, which keeps task parameters small in the Prefect UI.
"""

from __future__ import annotations

from dataclasses import fields

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from toa.batches import BatchRef, batch_key, manifest, source_key
from toa.config import RunConfig
from toa.errors import UserError
from toa.prompts import display_name, iter_prompts
from toa.rows import Prompt, PromptRow, SkippedRow
from toa.storage import Store


@task(name="load-prompts", cache_policy=NO_CACHE)
def load_prompt_batches(cfg: RunConfig) -> list[BatchRef]:
    store = Store(cfg.results_root, cfg.storage_options)
    source = source_key(cfg)
    if store.exists(*manifest(source)):
        return [BatchRef(**b) for b in store.read_json(*manifest(source))["batches"]]
    batches, skipped, pending = [], [], []
    for item in iter_prompts(cfg.prompts):  # raises BadPromptRow (file:line: reason) in fail mode
        if isinstance(item, SkippedRow):
            skipped.append(item)
            continue
        pending.append(item)
        if len(pending) == cfg.batch_size:
            batches.append(_write_batch(store, source, pending))
            pending = []
    if pending:
        batches.append(_write_batch(store, source, pending))
    if skipped:
        store.write_rows("skipped_rows", skipped, f"source={source}", "skipped.parquet")
        if not batches:
            raise UserError(f"{display_name(cfg.prompts.path)}: all {len(skipped)} rows were skipped as bad, no prompt "
                            f"is left; first: line {skipped[0].line}: {skipped[0].reason} (see the skipped_rows view)")
        get_run_logger().warning("skipped %d bad prompt rows (see the skipped_rows view); first: %s:%d: %s",
                                 len(skipped), skipped[0].source, skipped[0].line, skipped[0].reason)
    store.write_json({"batches": [b.__dict__ for b in batches]}, *manifest(source))
    return batches


def _write_batch(store: Store, source: str, prompts: list[Prompt]) -> BatchRef:
    ref = BatchRef(key=batch_key(prompts), source=source, size=len(prompts))
    rows = [PromptRow(**vars(p), batch=ref.key) for p in prompts]
    store.write_rows("prompts", rows, f"source={source}", f"{ref.key}.parquet")
    return ref


def read_batch(store: Store, ref: BatchRef) -> list[Prompt]:
    df = store.read("prompts", f"source={ref.source}", f"{ref.key}.parquet")
    names = [f.name for f in fields(Prompt)]
    return [Prompt(**{name: r[name] for name in names}) for r in df.iter_rows(named=True)]
