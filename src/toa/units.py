"""What is finished: a (method, batch) unit's record (`BatchStats`, written as its done marker
when nothing failed, with the shards it wrote) and a whole run's recorded result (with the
shards it rests on). Both are trusted only while those shards are there with their recorded
sizes: stat-level checks, so the rerun shortcut stays a few file checks (docs/design.md §4.4).
`completed` is the one reader of done markers: the run plan asks it what is left, run_batch
asks it before working a unit.
Plain Python (no Prefect): `toa plan` and `toa run`'s rerun check read these before any
Prefect API exists.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from toa.config import Price
from toa.plan import RunPlan
from toa.rows import OK, CallRecord
from toa.storage import Store


# Not a table, so not in toa.rows: the result of one (method, batch) task and, as JSON, its
# `done` marker; it lives with the code that counts it and reads the marker back.
@dataclass
class BatchStats:
    method: str
    batch: str
    prompts: int = 0
    samples: int = 0
    calls_made: int = 0  # new generations made by model calls in this attempt
    calls_failed: int = 0
    cached: int = 0  # generations replayed from the record
    reward_errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    method_errors: int = 0  # prompts whose method raised
    skipped: bool = False  # the batch was already done
    seconds: float = 0.0
    worker: str = ""  # host:pid of the process that ran it (threads: the flow's; Dask: a worker's)
    cost: float | None = None  # money of the calls made in this attempt (calls_cost); None: no price
    currency: str | None = None

    @property
    def failed(self) -> bool:
        return bool(self.calls_failed or self.reward_errors or self.method_errors)


def done_marker(run_id: str, method: str, batch: str) -> tuple[str, ...]:
    return ("done", f"run={run_id}", f"method={method}", f"{batch}.json")


# The tables a (method, batch) unit writes under <table>/run=<id>/method=<m>/<batch>.parquet
# (toa.engine._write_outputs): samples always, the others when the method returns such rows.
UNIT_TABLES = ("samples", "tree_nodes", "value_targets", "dialogues")
# The tables a finished run's result rests on (docs/design.md §4.4): its samples and the
# methods' further tables (the summary and the report are computed from them), its datasets
# (sft, dpo) and its verdicts. Not calls, rewards or prompts: those are partitioned by batch or
# source, shared with other runs and grown by journal recovery, and nothing in the recorded
# result is read from them; a lost call shard costs a replay, never a wrong result. Not
# prefix_cache or runs: records of attempts, not of the result.
RESULT_TABLES = (*UNIT_TABLES, "sft", "dpo", "verdicts")


def unit_shards(store: Store, run_id: str, method: str, batch: str) -> dict[str, int]:
    """The shards one unit wrote, as {path relative to the root: size in bytes}."""
    paths = ["/".join((table, f"run={run_id}", f"method={method}", f"{batch}.parquet")) for table in UNIT_TABLES]
    sizes = shard_sizes(store, paths)
    return {p: size for p, size in sizes.items() if size is not None}


def mark_done(store: Store, run_id: str, stats: BatchStats) -> None:
    """Write a finished unit's done marker: its BatchStats and the shards it wrote with their
    sizes, which `completed` checks (a shard deleted or truncated by hand undoes the unit)."""
    shards = unit_shards(store, run_id, stats.method, stats.batch)
    store.write_json({**asdict(stats), "shards": shards}, *done_marker(run_id, stats.method, stats.batch))


def completed(store: Store, run_id: str, method: str, batch: str) -> BatchStats | None:
    """The record of a finished (method, batch) unit, as this run counts it: skipped, every
    sample replayed, no call made. None: not finished, or its shards are no longer what its
    marker recorded (deleted or changed by hand: the unit is made again, its calls replayed).
    The one reader of done markers (the run plan asks it what is left; run_batch, for a unit
    finished elsewhere since)."""
    if not store.exists(*done_marker(run_id, method, batch)):
        return None
    recorded = store.read_json(*done_marker(run_id, method, batch))
    # A marker written before shards were recorded: its samples shard must at least exist.
    shards = recorded.get("shards") or {"/".join(("samples", f"run={run_id}", f"method={method}", f"{batch}.parquet")): None}
    if changed_shards(store, shards):
        return None
    done = BatchStats(**{k: v for k, v in recorded.items() if k in BatchStats.__dataclass_fields__})
    return BatchStats(method, batch, prompts=done.prompts, samples=done.samples, cached=done.samples,
                      prompt_tokens=done.prompt_tokens, completion_tokens=done.completion_tokens, skipped=True,
                      worker=done.worker)


def unit_states(plan: RunPlan, batches: list[Any]) -> list[tuple[str, Any, Any]]:
    """(method, batch, its BatchStats if finished else None) for every unit of the run."""
    store = Store(plan.cfg.results_root, plan.cfg.storage_options)
    return [(m, b, completed(store, plan.run_id, m, b.key)) for m in plan.cfg.methods for b in batches]


# -- shards and their sizes: stat-level checks, never a Parquet read (the rerun shortcut is timed)
def shard_sizes(store: Store, paths: Iterable[str]) -> dict[str, int | None]:
    """{path relative to the root: its size, None when missing}. A local root: one stat per
    shard. An object store: one listing per folder holding several of them (one request, not
    one per shard), one HEAD for a folder holding one."""
    paths = list(paths)
    if store.local:
        return {p: _local_size(store.path(p)) for p in paths}
    by_folder: dict[str, list[str]] = {}
    for path in paths:
        by_folder.setdefault(path.rpartition("/")[0], []).append(path)
    sizes: dict[str, int | None] = {}
    for folder, inside in by_folder.items():
        try:
            listing = (store.fs.ls(store.path(folder), detail=True) if len(inside) > 1
                       else [store.fs.info(store.path(inside[0]))])
        except (FileNotFoundError, NotADirectoryError):
            listing = []
        found = {entry["name"].rstrip("/").rpartition("/")[2]: entry.get("size") for entry in listing
                 if entry.get("type") == "file"}
        sizes.update({p: found.get(p.rpartition("/")[2]) for p in inside})
    return sizes


def _local_size(path: str) -> int | None:
    try:
        return os.stat(path).st_size
    except (FileNotFoundError, NotADirectoryError):
        return None


def changed_shards(store: Store, recorded: Mapping[str, int | None]) -> list[str]:
    """The recorded shards that are missing or whose size differs (a None size: must exist)."""
    now = shard_sizes(store, recorded)
    return [p for p, size in recorded.items() if now[p] is None or (size is not None and now[p] != size)]


def run_shards(store: Store, run_id: str, methods: Iterable[str]) -> dict[str, int]:
    """Every shard of the run's result (RESULT_TABLES) as {path relative to the root: size}."""
    found: dict[str, int] = {}
    for table in RESULT_TABLES:
        base = store.path(table, f"run={run_id}")
        try:
            entries = store.fs.find(base, detail=True)
        except FileNotFoundError:
            continue
        for name, info in entries.items():
            relative = name[len(store.root) + 1:] if name.startswith(store.root + "/") else None
            if relative and name.endswith(".parquet") and info.get("type") == "file":
                parts = relative.split("/")
                if table == "verdicts" or (len(parts) > 2 and parts[2] in {f"method={m}" for m in methods}):
                    found[relative] = info["size"]
    return found


def result_marker(run_id: str) -> tuple[str, ...]:
    """The recorded result of a run whose every unit finished (tasks/plan.py finish_run)."""
    return ("runs", f"run={run_id}", "result.json")  # beside the run records, not among done markers


def write_result(plan: RunPlan, result: dict[str, Any], units: int) -> None:
    """Record a finished run's result with the shards it rests on (`run_shards`) and their
    sizes: `check_result` trusts it only while they are all there, unchanged."""
    store = Store(plan.cfg.results_root, plan.cfg.storage_options)
    shards = run_shards(store, plan.run_id, plan.cfg.methods)
    store.write_json({**result, "units": units, "shards": shards}, *result_marker(plan.run_id))


def set_aside_changed(store: Store, run_id: str, busy: Callable[[str, str], bool] = lambda method, batch: False) -> list[str]:
    """Rename the shards the run's recorded result names whose size changed since (truncated or
    rewritten by hand) to `<name>.changed-<unix time>`, out of the views' `*.parquet` reach, and
    return them. A resume rewrites those paths anyway (their unit is made again, the datasets
    rebuilt), and a corrupt shard would fail the views before it could; renamed, whatever was
    there is kept for whoever changed it. A unit's shards are left alone while `busy(method,
    batch)`: a unit begun ahead of the flow (toa.head_start) may already have rewritten them."""
    if not store.exists(*result_marker(run_id)):
        return []
    shards = store.read_json(*result_marker(run_id)).get("shards") or {}
    now = shard_sizes(store, shards)
    changed = [p for p, size in shards.items() if now[p] is not None and now[p] != size and not _of_busy_unit(p, busy)]
    for path in changed:
        store.fs.mv(store.path(path), f"{store.path(path)}.changed-{int(time.time())}")
    return changed


def _of_busy_unit(path: str, busy: Callable[[str, str], bool]) -> bool:
    table, _, method, name = (path.split("/") + ["", "", "", ""])[:4]
    return table in UNIT_TABLES and busy(method.removeprefix("method="), name.removesuffix(".parquet"))


@dataclass(frozen=True)
class ResultCheck:
    """What the rerun shortcut found: the recorded result to return, or why not (None: there
    is simply work left or no result, nothing to say)."""

    result: dict[str, Any] | None
    why: str | None = None


def check_result(plan: RunPlan, units: list[tuple[str, Any, Any]]) -> ResultCheck:
    """The recorded result of the run when every unit is finished and the shards it names are
    all there with their recorded sizes (docs/design.md §4.4), so that rerunning it costs a few
    file checks (no Prefect API, sampling, dataset rebuild or report); its summary then counts
    every sample as replayed. Otherwise no result, and a one-line reason when a recorded result
    was there but is not trusted: the run then resumes normally."""
    store = Store(plan.cfg.results_root, plan.cfg.storage_options)
    if not store.exists(*result_marker(plan.run_id)):
        return ResultCheck(None)
    recorded = store.read_json(*result_marker(plan.run_id))
    why = _distrust(store, recorded, units)
    if why is not None:
        return ResultCheck(None, f"run {plan.run_id}: {why}: resuming")
    for row in recorded["summary"]:
        row["new_calls"], row["replayed"] = 0, row.get("new_calls", 0) + row.get("replayed", 0)
    return ResultCheck(recorded)


def _distrust(store: Store, recorded: dict[str, Any], units: list[tuple[str, Any, Any]]) -> str | None:
    """Why a recorded result is not this run's result any more, or None. Pops the keys that
    are not part of the result (units, shards)."""
    if recorded.pop("units", None) != len(units):  # e.g. the prompt file grew: not the same work
        return f"the recorded result covers other units than the {len(units)} of this run"
    shards = recorded.pop("shards", None)
    if shards is None:
        return "the recorded result names no shards (an older toa wrote it), so they cannot be checked"
    changed = changed_shards(store, shards)
    if changed:
        shown = ", ".join(changed[:3]) + (", ..." if len(changed) > 3 else "")
        return (f"recorded result names {_count(len(changed), 'shard')} that {'is' if len(changed) == 1 else 'are'} "
                f"missing or changed ({shown})")
    undone = sum(done is None for _, _, done in units)
    if undone:  # a done marker removed, or naming a shard that changed since
        return f"{_count(undone, 'unit')} of the recorded result {'is' if undone == 1 else 'are'} not done"
    return None


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


# -- cost and compute (sql/cost.sql holds the same rules for the recorded runs) ---------------
def calls_cost(records: Iterable[CallRecord], prices: Mapping[str, Price]) -> tuple[float | None, str | None]:
    """(money, currency) of these calls at their agents' prices: each successful call at
    Price.call_cost with its server_s, or its client latency where the server reported none;
    agents without a price count as free. (None, None) when no agent has a price, or when the
    prices are in different currencies (no sum to give)."""
    currencies = {p.currency for p in prices.values()}
    if len(currencies) != 1:
        return None, None
    total = 0.0
    for r in records:
        price = prices.get(r.agent)
        if price is not None and r.status == OK:
            seconds = r.server_s if r.server_s is not None else r.latency_s
            total += price.call_cost(r.prompt_tokens, r.completion_tokens, seconds, r.request_choices)
    return total, currencies.pop()


Counters = tuple[float, float]  # (vllm:prefix_cache_queries_total, vllm:prefix_cache_hits_total)


def cache_growth(before: Counters | None, after: Counters | None) -> tuple[float | None, float | None]:
    """(queries, hits) a server's prefix cache took between two readings of its counters; (None,
    None) when either reading is missing (no /metrics, no such counter) or the counters went
    back (the server restarted between them): unknown, never 0."""
    if before is None or after is None:
        return None, None
    queries, hits = after[0] - before[0], after[1] - before[1]
    if queries < 0 or hits < 0:
        return None, None
    return queries, hits
