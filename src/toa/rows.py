"""The one row vocabulary every stage shares.

Methods produce `Sample`s, the request layer produces `CallRecord`s, the reward service
`RewardRecord`s, prompt loading `Prompt`s and `SkippedRow`s. Storage writes each kind to its
own Parquet table with the schema below (`SCHEMAS`), and the SQL views in sql/ read those
column names, so a rename here is a rename everywhere.

Errors are data: a failed call or reward is a row with status "error" and its message; the
reward stays None and is never turned into 0.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import polars as pl

OK = "ok"
ERROR = "error"
SKIPPED = "skipped"  # a Score for a sample that is not a response to the prompt (PRS feedback)


def content_key(*parts: Any) -> str:
    """A stable sha256 over JSON-serialisable parts (sorted keys, no whitespace drift)."""
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Prompt:
    prompt_id: str
    text: str
    reference: str | None = None  # what a reference-based reward needs (gold answer, reference text)
    source: str = ""
    line: int = 0  # 1-based line (jsonl/csv) or row (parquet) in the source


@dataclass(frozen=True)
class SkippedRow:
    source: str
    line: int
    reason: str
    raw: str  # the offending row, truncated


@dataclass(frozen=True)
class Generation:
    """What `generate` hands a method: one sampled response, or the error that replaced it."""

    sample_id: str  # = the call key of this sample slot
    agent: str
    text: str | None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float = 0.0
    status: str = OK
    error: str | None = None
    cached: bool = False
    logprob: float | None = None  # sum of the completion's token logprobs, when the server gave them

    @property
    def ok(self) -> bool:
        return self.status == OK

    @property
    def mean_logprob(self) -> float | None:
        """Per-token mean logprob (a length-normalized likelihood: PUCT priors, Optima's loss)."""
        if self.logprob is None or not self.completion_tokens:
            return None
        return self.logprob / self.completion_tokens


@dataclass(frozen=True)
class Score:
    """What `reward` hands a method: a raw reward, or the error that replaced it."""

    value: float | None
    status: str = OK
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == OK and self.value is not None


@dataclass(frozen=True)
class Sample:
    """One generation as a method saw it, with its provenance. Methods return these."""

    generation: Generation
    score: Score
    action: str  # method-specific label, e.g. the agent name (Random/PE) or "A_layer_1" (TOA)
    parent_id: str | None = None  # the sample this one refined / aggregated, if any
    depth: int = 0
    order: int = 0  # position in the method's generation order (0-based)


@dataclass(frozen=True)
class TreeNode:
    """One node of a search tree (TOA): kept so a tree can be drawn, replayed and queried."""

    node_id: str  # unique within the prompt's tree, e.g. "n17"
    parent_id: str | None
    kind: str  # "root" | "agent" | "response"
    agent: str | None
    depth: int
    visits: int
    value: float | None  # mean of the backed-up values
    n_values: int
    sample_id: str | None  # the generation a response node holds
    created: int  # creation order


@dataclass
class MethodOutput:
    """What a method returns: every sample it generated, and its tree if it searched one."""

    samples: list[Sample]
    nodes: list[TreeNode] = field(default_factory=list)
    # Further rows for other tables of SCHEMAS, {table: [row dicts]}: the engine adds run_id,
    # method, batch and prompt_id and writes one shard per (run, method, batch), like tree_nodes.
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


@dataclass(frozen=True)
class CallRecord:
    call_key: str
    prompt_id: str
    agent: str
    model: str  # the model identity (served name + weights fingerprint)
    request_json: str  # messages + sampling parameters, as sent
    seed: int
    slot: int
    text: str | None
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    status: str
    error: str | None
    created_at: float
    logprob: float | None = None  # sum of token logprobs; null for records made before it was kept


@dataclass(frozen=True)
class RewardRecord:
    reward_key: str
    reward_id: str  # reward identity: backend + model + revision + template hash
    prompt_id: str
    response_sha: str
    value: float | None
    status: str
    error: str | None
    latency_s: float
    created_at: float


SCHEMAS: dict[str, dict[str, pl.DataType]] = {
    "calls": {
        "call_key": pl.Utf8, "prompt_id": pl.Utf8, "agent": pl.Utf8, "model": pl.Utf8,
        "request_json": pl.Utf8, "seed": pl.Int64, "slot": pl.Int64, "text": pl.Utf8,
        "finish_reason": pl.Utf8, "prompt_tokens": pl.Int64, "completion_tokens": pl.Int64,
        "latency_s": pl.Float64, "status": pl.Utf8, "error": pl.Utf8, "created_at": pl.Float64,
        "logprob": pl.Float64,
    },
    "rewards": {
        "reward_key": pl.Utf8, "reward_id": pl.Utf8, "prompt_id": pl.Utf8,
        "response_sha": pl.Utf8, "value": pl.Float64, "status": pl.Utf8, "error": pl.Utf8,
        "latency_s": pl.Float64, "created_at": pl.Float64,
    },
    "samples": {
        "run_id": pl.Utf8, "method": pl.Utf8, "batch": pl.Utf8, "prompt_id": pl.Utf8,
        "sample_id": pl.Utf8, "order": pl.Int64, "agent": pl.Utf8, "action": pl.Utf8,
        "parent_id": pl.Utf8, "depth": pl.Int64, "text": pl.Utf8, "finish_reason": pl.Utf8,
        "prompt_tokens": pl.Int64, "completion_tokens": pl.Int64, "latency_s": pl.Float64,
        "cached": pl.Boolean, "status": pl.Utf8, "error": pl.Utf8, "reward": pl.Float64,
        "reward_status": pl.Utf8, "reward_error": pl.Utf8,
    },
    "tree_nodes": {
        "run_id": pl.Utf8, "method": pl.Utf8, "batch": pl.Utf8, "prompt_id": pl.Utf8,
        "node_id": pl.Utf8, "parent_id": pl.Utf8, "kind": pl.Utf8, "agent": pl.Utf8,
        "depth": pl.Int64, "visits": pl.Int64, "value": pl.Float64, "n_values": pl.Int64,
        "sample_id": pl.Utf8, "created": pl.Int64,
    },
    # step_mcts: per visited node, the state (prompt + steps so far) and its mean verified
    # outcome over `visits` rollouts: training targets for a value model.
    "value_targets": {
        "run_id": pl.Utf8, "method": pl.Utf8, "batch": pl.Utf8, "prompt_id": pl.Utf8,
        "node_id": pl.Utf8, "parent_id": pl.Utf8, "depth": pl.Int64, "prompt": pl.Utf8,
        "state": pl.Utf8, "visits": pl.Int64, "value": pl.Float64, "prior": pl.Float64,
        "terminal": pl.Boolean,
    },
    "prompts": {
        "prompt_id": pl.Utf8, "text": pl.Utf8, "reference": pl.Utf8, "source": pl.Utf8,
        "line": pl.Int64, "batch": pl.Utf8,
    },
    "skipped_rows": {"source": pl.Utf8, "line": pl.Int64, "reason": pl.Utf8, "raw": pl.Utf8},
    "runs": {
        "run_id": pl.Utf8, "started_at": pl.Float64, "config_json": pl.Utf8,
        "models_json": pl.Utf8, "reward_id": pl.Utf8,
    },
    "sft": {
        "run_id": pl.Utf8, "method": pl.Utf8, "prompt_id": pl.Utf8, "prompt": pl.Utf8,
        "response": pl.Utf8, "agent": pl.Utf8, "action": pl.Utf8, "reward": pl.Float64,
        "sample_id": pl.Utf8, "n_samples": pl.Int64,
        "messages": pl.Utf8,  # chat JSON for multi-turn examples (dialogue methods); null: [prompt, response]
    },
    "dpo": {
        "run_id": pl.Utf8, "method": pl.Utf8, "prompt_id": pl.Utf8, "prompt": pl.Utf8,
        "chosen": pl.Utf8, "rejected": pl.Utf8, "chosen_agent": pl.Utf8,
        "rejected_agent": pl.Utf8, "chosen_reward": pl.Float64, "rejected_reward": pl.Float64,
        "rejected_rank": pl.Int64, "chosen_id": pl.Utf8, "rejected_id": pl.Utf8,
        "prompt_messages": pl.Utf8,  # chat JSON of a multi-turn context (dialogue methods); null: prompt alone
    },
    # one row per dialogue of the `optima` method (toa.methods.dialogue)
    "dialogues": {
        "run_id": pl.Utf8, "method": pl.Utf8, "batch": pl.Utf8, "prompt_id": pl.Utf8,
        "dialogue_id": pl.Utf8, "mode": pl.Utf8, "speakers": pl.Utf8, "turns": pl.Int64,
        "stop_reason": pl.Utf8, "final_answer": pl.Utf8, "correct": pl.Float64, "tokens": pl.Int64,
        "max_loss": pl.Float64, "reward_kind": pl.Utf8, "reward": pl.Float64, "reward_status": pl.Utf8,
        "reward_error": pl.Utf8, "utterance_ids": pl.Utf8,
    },
    # Prompt evolution (toa.evolve): one row per evolution step, kept or rejected (with why).
    "evolutions": {
        "evolve_id": pl.Utf8, "iteration": pl.Int64, "from_run_id": pl.Utf8, "prompt_id": pl.Utf8,
        "parent_prompt_id": pl.Utf8, "root_prompt_id": pl.Utf8, "step": pl.Int64, "kind": pl.Utf8,
        "kinds": pl.Utf8, "agent": pl.Utf8, "call_key": pl.Utf8, "reference_call_key": pl.Utf8,
        "text": pl.Utf8, "reference": pl.Utf8, "status": pl.Utf8, "reason": pl.Utf8,
        "metric": pl.Utf8, "parent_metric": pl.Float64,
    },
    # One row per evolve-loop iteration: which run sampled which prompt set.
    "evolve_iterations": {
        "evolve_id": pl.Utf8, "iteration": pl.Int64, "run_id": pl.Utf8, "prompts_path": pl.Utf8,
        "prompts": pl.Int64, "evolved": pl.Int64, "selected": pl.Int64, "created_at": pl.Float64,
    },
    # Correctness of every generation of a verifiable prompt source (toa.verdicts).
    "verdicts": {
        "run_id": pl.Utf8, "method": pl.Utf8, "prompt_id": pl.Utf8, "sample_id": pl.Utf8,
        "answer": pl.Utf8, "correct": pl.Boolean, "verifier": pl.Utf8,
    },
}


def frame(table: str, rows: list[Any]) -> pl.DataFrame:
    """Rows (dataclasses or dicts) as a DataFrame with the table's exact schema."""
    dicts = [dataclasses.asdict(r) if dataclasses.is_dataclass(r) else r for r in rows]
    schema = SCHEMAS[table]
    return pl.DataFrame([{k: d.get(k) for k in schema} for d in dicts], schema=schema, orient="row") if dicts \
        else pl.DataFrame(schema=schema)


def sample_row(sample: Sample, *, run_id: str, method: str, batch: str, prompt_id: str) -> dict:
    g, s = sample.generation, sample.score
    return {
        "run_id": run_id, "method": method, "batch": batch, "prompt_id": prompt_id,
        "sample_id": g.sample_id, "order": sample.order, "agent": g.agent,
        "action": sample.action, "parent_id": sample.parent_id, "depth": sample.depth,
        "text": g.text, "finish_reason": g.finish_reason, "prompt_tokens": g.prompt_tokens,
        "completion_tokens": g.completion_tokens, "latency_s": g.latency_s, "cached": g.cached,
        "status": g.status, "error": g.error, "reward": s.value, "reward_status": s.status,
        "reward_error": s.error,
    }


__all__ = [
    "ERROR",
    "OK",
    "SCHEMAS",
    "SKIPPED",
    "CallRecord",
    "Generation",
    "MethodOutput",
    "Prompt",
    "RewardRecord",
    "Sample",
    "Score",
    "SkippedRow",
    "TreeNode",
    "content_key",
    "frame",
    "sample_row",
]
