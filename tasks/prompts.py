"""Prompt loading task: stream the source once into prompt shards, one per batch.

The shards (and the skipped rows) are keyed by the source's identity, its size and
modification time, and the batch size, so a rerun on an unchanged file reuses them instead of
reading the source again. Batches are what the sampling tasks receive: a small reference, not
the prompts themselves, which keeps task parameters small in the Prefect UI.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import fsspec
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from toa.config import RunConfig
from toa.errors import UserError
from toa.prompts import display_name, iter_prompts
from toa.rows import Prompt, PromptRow, SkippedRow, content_key
from toa.storage import Store


# Not a table, so not in toa.rows: a task parameter (which prompt shard a sampling task reads)
# and an entry of the source's manifest.json; it never goes through rows.frame.
@dataclass(frozen=True)
class BatchRef:
    key: str  # hash of the batch's prompt ids: names its shards and its call cache partition
    source: str  # source key: the prompts/<source>/ folder
    size: int


def source_key(cfg: RunConfig) -> str:
    fs, path = fsspec.core.url_to_fs(cfg.prompts.path, **cfg.prompts.storage_options)
    info = fs.info(path)
    stamp = [info.get("size"), info.get("mtime") or info.get("LastModified") or info.get("ETag")]
    return content_key(cfg.prompts.fingerprint(), cfg.batch_size, str(stamp))[:16]


def planned_batches(cfg: RunConfig) -> list[BatchRef]:
    """The batches a run would get, writing nothing (`toa plan`): the stored manifest when the
    source was loaded before, else the source read and cut into batches in memory."""
    store = Store(cfg.results_root, cfg.storage_options)
    source = source_key(cfg)
    manifest = ("prompts", f"source={source}", "manifest.json")
    if store.exists(*manifest):
        return [BatchRef(**b) for b in store.read_json(*manifest)["batches"]]
    prompts = [p for p in iter_prompts(cfg.prompts) if not isinstance(p, SkippedRow)]
    chunks = [prompts[i:i + cfg.batch_size] for i in range(0, len(prompts), cfg.batch_size)]
    return [BatchRef(key=batch_key(chunk), source=source, size=len(chunk)) for chunk in chunks]


def batch_key(prompts: list[Prompt]) -> str:
    """Names a batch's shards and its call cache partition: a hash of its prompt ids."""
    return content_key([p.prompt_id for p in prompts])[:16]


@task(name="load-prompts", cache_policy=NO_CACHE)
def load_prompt_batches(cfg: RunConfig) -> list[BatchRef]:
    store = Store(cfg.results_root, cfg.storage_options)
    source = source_key(cfg)
    manifest = ("prompts", f"source={source}", "manifest.json")
    if store.exists(*manifest):
        return [BatchRef(**b) for b in store.read_json(*manifest)["batches"]]
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
    store.write_json({"batches": [b.__dict__ for b in batches]}, *manifest)
    return batches


def _write_batch(store: Store, source: str, prompts: list[Prompt]) -> BatchRef:
    ref = BatchRef(key=batch_key(prompts), source=source, size=len(prompts))
    rows = [PromptRow(**vars(p), batch=ref.key) for p in prompts]
    store.write_rows("prompts", rows, f"source={source}", f"{ref.key}.parquet")
    return ref


def read_batch(store: Store, ref: BatchRef) -> list[Prompt]:
    df = store.read("prompts", f"source={ref.source}", f"{ref.key}.parquet")
    return [Prompt(**{f.name: r[f.name] for f in fields(Prompt)}) for r in df.iter_rows(named=True)]
