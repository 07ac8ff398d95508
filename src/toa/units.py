"""What is finished: a (method, batch) unit's record (`BatchStats`, written as its done marker
when nothing failed) and a whole run's recorded result. `completed` is the one reader of done
markers: the run plan asks it what is left, run_batch asks it before working a unit.
Plain Python (no Prefect): `toa plan` and `toa run`'s rerun check read these before any
Prefect API exists.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
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


def completed(store: Store, run_id: str, method: str, batch: str) -> BatchStats | None:
    """The record of a finished (method, batch) unit, as this run counts it: skipped, every
    sample replayed, no call made. None: not finished. The one reader of done markers (the
    run plan asks it what is left; run_batch, for a unit finished elsewhere since)."""
    if not store.exists(*done_marker(run_id, method, batch)):
        return None
    recorded = store.read_json(*done_marker(run_id, method, batch))
    done = BatchStats(**{k: v for k, v in recorded.items() if k in BatchStats.__dataclass_fields__})
    return BatchStats(method, batch, prompts=done.prompts, samples=done.samples, cached=done.samples,
                      prompt_tokens=done.prompt_tokens, completion_tokens=done.completion_tokens, skipped=True,
                      worker=done.worker)


def unit_states(plan: RunPlan, batches: list[Any]) -> list[tuple[str, Any, Any]]:
    """(method, batch, its BatchStats if finished else None) for every unit of the run."""
    store = Store(plan.cfg.results_root, plan.cfg.storage_options)
    return [(m, b, completed(store, plan.run_id, m, b.key)) for m in plan.cfg.methods for b in batches]


def result_marker(run_id: str) -> tuple[str, ...]:
    """The recorded result of a run whose every unit finished (tasks/plan.py finish_run)."""
    return ("runs", f"run={run_id}", "result.json")  # beside the run records, not among done markers


def finished_result(plan: RunPlan, units: list[tuple[str, Any, Any]]) -> dict[str, Any] | None:
    """The recorded result of the run when every unit is finished, so that rerunning it costs a
    few file checks (no Prefect API, sampling, dataset rebuild or report); its summary then
    counts every sample as replayed. None when something is left to do."""
    store = Store(plan.cfg.results_root, plan.cfg.storage_options)
    if any(done is None for _, _, done in units) or not store.exists(*result_marker(plan.run_id)):
        return None
    recorded = store.read_json(*result_marker(plan.run_id))
    if recorded.pop("units", None) != len(units):  # e.g. the prompt file grew: not the same work
        return None
    for row in recorded["summary"]:
        row["new_calls"], row["replayed"] = 0, row.get("new_calls", 0) + row.get("replayed", 0)
    return recorded


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
