"""A run's prompt batches, as planned: which batches a prompt source makes and how they are
named. Plain Python (no Prefect): `toa plan` and the rerun check of `toa run` use it before
any Prefect API exists; tasks/prompts.py writes the batches.
"""

from __future__ import annotations

from dataclasses import dataclass

import fsspec

from toa.config import RunConfig
from toa.prompts import iter_prompts
from toa.rows import Prompt, SkippedRow, content_key
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


def manifest(source: str) -> tuple[str, ...]:
    """Where the batches of a loaded source are listed (written by tasks/prompts.py)."""
    return ("prompts", f"source={source}", "manifest.json")


def planned_batches(cfg: RunConfig) -> list[BatchRef]:
    """The batches a run would get, writing nothing (`toa plan`): the stored manifest when the
    source was loaded before, else the source read and cut into batches in memory."""
    store = Store(cfg.results_root, cfg.storage_options)
    source = source_key(cfg)
    if store.exists(*manifest(source)):
        return [BatchRef(**b) for b in store.read_json(*manifest(source))["batches"]]
    prompts = [p for p in iter_prompts(cfg.prompts) if not isinstance(p, SkippedRow)]
    chunks = [prompts[i:i + cfg.batch_size] for i in range(0, len(prompts), cfg.batch_size)]
    return [BatchRef(key=batch_key(chunk), source=source, size=len(chunk)) for chunk in chunks]


def batch_key(prompts: list[Prompt]) -> str:
    """Names a batch's shards and its call cache partition: a hash of its prompt ids."""
    return content_key([p.prompt_id for p in prompts])[:16]
