"""The one row vocabulary every stage shares.

Every stored table has one typed row class below, and `TABLES` maps the table name to it; the
table's Parquet schema (`SCHEMAS`) is derived from that class's fields, so each column is
declared once, as an annotated field. The SQL views in sql/ read those column names, so a rename
here is a rename everywhere. `frame` turns rows into a DataFrame of the table's exact schema and
raises `RowError` on a row with an unknown or missing column instead of storing a null (a dict
row may leave out a column its row class gives a default, as a call to the class may: the
columns added after a table's first rows, e.g. CallRecord.logprob).

Methods return `Sample`s (stored as `SampleRow`s) and their parts of further tables (`TreeNode`,
`ValueTarget`, `DialogueRecord`) without the run, method, batch and prompt they belong to: the
engine knows those and completes each part into its table's row class (`BatchKeys`, `keyed`).
The request layer produces `CallRecord`s, the reward service `RewardRecord`s, prompt loading
`Prompt`s and `SkippedRow`s.

Records that are not tables (a task's parameter or result, never passed to `frame`) live with
the code that makes them: toa.batches.BatchRef, toa.units.BatchStats.

Errors are data: a failed call or reward is a row with status "error" and its message; the
reward stays None and is never turned into 0.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import operator
import types
import typing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import polars as pl

if TYPE_CHECKING:
    from collections.abc import Sequence

    import pyarrow as pa

OK = "ok"
ERROR = "error"
SKIPPED = "skipped"  # a Score for a sample that is not a response to the prompt (PRS feedback)

Message = dict[str, str]  # one chat message: {"role": ..., "content": ...}


def content_key(*parts: Any) -> str:
    """A stable sha256 over JSON-serialisable parts (sorted keys, no whitespace drift)."""
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


# -- what methods see and return (not stored as they are) ----------------------------------

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
    """One generation as a method saw it, with its provenance. Methods return these; the
    engine stores each as a `SampleRow` (`sample_row`)."""

    generation: Generation
    score: Score
    action: str  # method-specific label, e.g. the agent name (Random/PE) or "A_layer_1" (TOA)
    parent_id: str | None = None  # the sample this one refined / aggregated, if any
    depth: int = 0
    order: int = 0  # position in the method's generation order (0-based)


@dataclass
class MethodOutput:
    """What a method returns: every sample it generated, and its tree if it searched one."""

    samples: list[Sample]
    nodes: list[TreeNode] = field(default_factory=list)
    # A method's rows of further tables, {table: [parts]}: each part is the table's row class
    # less the BatchKeys (ValueTarget for value_targets, DialogueRecord for dialogues).
    tables: dict[str, list[Any]] = field(default_factory=dict)

    def table_rows(self, **keys: str) -> dict[str, list[Any]]:
        """The tree nodes and the further tables as stored rows, completed with `keys`
        (run_id, method, batch, prompt_id: what the engine knows and the method does not)."""
        where = BatchKeys(**keys)
        parts = {"tree_nodes": self.nodes, **self.tables} if self.nodes else self.tables
        return {table: [keyed(table, part, where) for part in rows] for table, rows in parts.items()}


# -- table rows --------------------------------------------------------------------------
# One class per table (TABLES); its fields, in order, are the table's columns. A field's
# annotation gives the column's dtype (`schema_of`); `| None` marks a column that may be null.

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
    # The server's own time for the HTTP request that returned this choice, in seconds, where the
    # server reports it (toa.calls._server_seconds: vLLM's `metrics` with --enable-per-request-metrics,
    # llama.cpp's `timings`); null otherwise and for records made before it was kept.
    server_s: float | None = None
    # How many choices that request returned (its n): they share its prompt and its server time,
    # so a record's share is 1 / request_choices (sql/cost.sql). Null before it was kept.
    request_choices: int | None = None


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


@dataclass(frozen=True)
class BatchKeys:
    """Where a method's row belongs. Not a table: the first columns of the tables a method
    writes. The engine knows them and a method does not, so a method returns its part of such
    a row (e.g. `TreeNode`) and the stored row class (`TreeNodeRow`) adds these in front."""

    run_id: str
    method: str
    batch: str
    prompt_id: str


@dataclass(frozen=True)
class SampleRow(BatchKeys):
    """A `samples` row: a `Sample` flattened, with its keys (made by `sample_row`)."""

    sample_id: str
    order: int
    agent: str
    action: str
    parent_id: str | None
    depth: int
    text: str | None
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    cached: bool
    status: str
    error: str | None
    reward: float | None
    reward_status: str
    reward_error: str | None


@dataclass(frozen=True)
class TreeNode:
    """One node of a search tree (TOA): kept so a tree can be drawn, replayed and queried.
    A method's part of a `tree_nodes` row."""

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


# A dataclass takes its bases' fields from the last base to the first: the keys come first,
# then the method's part, as the stored columns are ordered.
@dataclass(frozen=True)
class TreeNodeRow(TreeNode, BatchKeys):
    """A `tree_nodes` row."""


@dataclass(frozen=True)
class ValueTarget:
    """step_mcts: a visited node's state (prompt + steps so far) and its mean verified outcome
    over `visits` rollouts, a training target for a value model. A method's part of a
    `value_targets` row."""

    node_id: str
    parent_id: str | None
    depth: int
    prompt: str
    state: str
    visits: int
    value: float | None
    prior: float | None
    terminal: bool


@dataclass(frozen=True)
class ValueTargetRow(ValueTarget, BatchKeys):
    """A `value_targets` row."""


@dataclass(frozen=True)
class Prompt:
    prompt_id: str
    text: str
    reference: str | None = None  # what a reference-based reward needs (gold answer, reference text)
    source: str = ""
    line: int = 0  # 1-based line (jsonl/csv) or row (parquet) in the source


@dataclass(frozen=True, kw_only=True)  # kw_only: a field without default after Prompt's defaults
class PromptRow(Prompt):
    """A `prompts` row: the prompt and the batch it was loaded into."""

    batch: str


@dataclass(frozen=True)
class SkippedRow:
    source: str
    line: int
    reason: str
    raw: str  # the offending row, truncated


@dataclass(frozen=True)
class RunRecord:
    """A `runs` row: one per start of a run."""

    run_id: str
    started_at: float
    config_json: str
    models_json: str  # agents' model identities, base URLs, launch settings, template hashes
    reward_id: str


@dataclass(frozen=True)
class SftRow:
    run_id: str
    method: str
    prompt_id: str
    prompt: str | None
    response: str | None
    agent: str
    action: str
    reward: float | None
    sample_id: str
    n_samples: int
    messages: str | None  # chat JSON for multi-turn examples (dialogue methods); null: [prompt, response]


@dataclass(frozen=True)
class DpoRow:
    run_id: str
    method: str
    prompt_id: str
    prompt: str | None
    chosen: str
    rejected: str
    chosen_agent: str
    rejected_agent: str
    chosen_reward: float
    rejected_reward: float
    rejected_rank: int
    chosen_id: str
    rejected_id: str
    prompt_messages: str | None  # chat JSON of a multi-turn context (dialogue methods); null: prompt alone


@dataclass(frozen=True)
class DialogueRecord:
    """One dialogue of the `optima` method (toa.methods.optima); its utterances are samples.
    The method's part of a `dialogues` row."""

    dialogue_id: str
    mode: str
    speakers: str  # JSON list of the two agents
    turns: int
    stop_reason: str | None
    final_answer: str | None
    correct: float | None
    tokens: int
    max_loss: float | None
    reward_kind: str
    reward: float | None
    reward_status: str
    reward_error: str | None
    utterance_ids: str  # JSON list of the utterances' sample_ids, root to leaf


@dataclass(frozen=True)
class DialogueRow(DialogueRecord, BatchKeys):
    """A `dialogues` row."""


@dataclass(frozen=True)
class EvolutionRow:
    """Prompt evolution (toa.evolve): one row per evolution step, kept or rejected (with why)."""

    evolve_id: str
    iteration: int
    from_run_id: str
    prompt_id: str | None
    parent_prompt_id: str
    root_prompt_id: str
    step: int
    kind: str
    kinds: str  # the chain of kinds from the root to this prompt, "deepen>breadth"
    agent: str
    call_key: str | None
    reference_call_key: str | None
    text: str | None
    reference: str | None
    status: str
    reason: str | None
    metric: str
    parent_metric: float | None


@dataclass(frozen=True)
class EvolveIterationRow:
    """One row per evolve-loop iteration: which run sampled which prompt set."""

    evolve_id: str
    iteration: int
    run_id: str
    prompts_path: str
    prompts: int
    evolved: int
    selected: int
    created_at: float


@dataclass(frozen=True)
class PrefixCacheRow:
    """One (method, batch) unit attempt's use of one server's prefix cache: the growth of vLLM's
    `vllm:prefix_cache_queries_total` / `_hits_total` (prompt tokens looked up / found) between
    the attempt's start and end (toa.engine). Null where the server published no such counter."""

    run_id: str
    method: str
    batch: str
    agents: str  # the aliases served by that server, comma-separated
    queries: float | None
    hits: float | None
    started_at: float
    seconds: float


@dataclass(frozen=True)
class VerdictRow:
    """Correctness of one generation of a verifiable prompt source (toa.verdicts)."""

    run_id: str
    method: str
    prompt_id: str
    sample_id: str
    answer: str | None
    correct: bool
    verifier: str


TABLES: dict[str, type] = {
    "calls": CallRecord,
    "rewards": RewardRecord,
    "samples": SampleRow,
    "tree_nodes": TreeNodeRow,
    "value_targets": ValueTargetRow,
    "prompts": PromptRow,
    "skipped_rows": SkippedRow,
    "runs": RunRecord,
    "sft": SftRow,
    "dpo": DpoRow,
    "dialogues": DialogueRow,
    "evolutions": EvolutionRow,
    "evolve_iterations": EvolveIterationRow,
    "verdicts": VerdictRow,
    "prefix_cache": PrefixCacheRow,
}

DTYPES: dict[type, pl.DataType] = {str: pl.Utf8, int: pl.Int64, float: pl.Float64, bool: pl.Boolean}


def schema_of(row_class: type) -> dict[str, pl.DataType]:
    """The Parquet schema of a row class: its fields in order, each annotation (`X` or
    `X | None`) mapped to a polars dtype by DTYPES."""
    hints = typing.get_type_hints(row_class)
    schema = {}
    for f in dataclasses.fields(row_class):
        hint = hints[f.name]
        if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
            args = [a for a in typing.get_args(hint) if a is not type(None)]
            hint = args[0] if len(args) == 1 else hint
        if hint not in DTYPES:
            raise TypeError(f"{row_class.__name__}.{f.name}: no column dtype for {hints[f.name]!r}")
        schema[f.name] = DTYPES[hint]
    return schema


SCHEMAS: dict[str, dict[str, pl.DataType]] = {table: schema_of(cls) for table, cls in TABLES.items()}


class RowError(ValueError):
    """A row that does not fit its table: an unknown or missing column, or another kind of row."""


def _schema(table: str) -> dict[str, pl.DataType]:
    if table not in SCHEMAS:
        raise RowError(f"unknown table {table!r}; tables: {', '.join(SCHEMAS)}")
    return SCHEMAS[table]


# Each row's values in its table's column order, taken by one C call per row (_values).
_ATTRS = {table: operator.attrgetter(*schema) for table, schema in SCHEMAS.items()}
# One getter per column: typed rows are read column by column, a block of rows at a time (_columns).
_GETTERS = {table: [operator.attrgetter(c) for c in schema] for table, schema in SCHEMAS.items()}
_BLOCK_ROWS = 1024
_ITEMS = {table: operator.itemgetter(*schema) for table, schema in SCHEMAS.items()}
# The columns a dict row may leave out: those added with a default (read back as the default).
_DEFAULTS = {table: {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
             for table, cls in TABLES.items()}


def _columns(table: str, rows: list[Any]) -> list[Sequence[Any]]:
    """The rows' values, one list per column in the table's order. Typed rows are read column
    by column, making no tuple per row: tuples are what the cyclic garbage collector counts, and
    at 16k-row shards among millions of live rows its passes doubled the conversion's CPU. They
    are read a block of rows at a time, so that a block's objects stay in the CPU's cache across
    the columns (0.6x of the CPU of whole-list passes at 16k rows; benchmarks/store_scale.py).
    Dict rows go through _values, row by row."""
    row_class = TABLES[table]
    if not all(isinstance(r, row_class) for r in rows):
        return list(zip(*(_values(table, r) for r in rows)))
    getters = _GETTERS[table]
    columns: list[list[Any]] = [[] for _ in getters]
    for start in range(0, len(rows), _BLOCK_ROWS):
        block = rows[start:start + _BLOCK_ROWS]
        for column, get in zip(columns, getters):
            column.extend(map(get, block))
    return columns


def _values(table: str, row: Any) -> tuple:
    """One row's column values in the table's order. A typed row must be the table's class; a
    dict (accepted while writers move to typed rows) must have the table's columns, less any
    its row class gives a default."""
    if isinstance(row, TABLES[table]):
        return _ATTRS[table](row)
    if not isinstance(row, dict):
        raise RowError(f"table {table!r} takes {TABLES[table].__name__} rows, not {type(row).__name__}")
    schema = SCHEMAS[table]
    if row.keys() != schema.keys():
        unknown = [k for k in row if k not in schema]
        missing = [c for c in schema if c not in row and c not in _DEFAULTS[table]]
        if unknown or missing:
            problems = ([f"unknown column(s) {', '.join(map(repr, unknown))}"] if unknown else []) + \
                       ([f"missing column(s) {', '.join(map(repr, missing))}"] if missing else [])
            raise RowError(f"table {table!r}: {'; '.join(problems)}")
        row = {**_DEFAULTS[table], **row}
    return _ITEMS[table](row)


def frame(table: str, rows: list[Any]) -> pl.DataFrame:
    """Rows (the table's row class, or dicts with its columns, defaulted ones optional) as a
    DataFrame with the table's exact schema; raises RowError on an unknown or missing column."""
    schema = _schema(table)
    if not rows:
        return pl.DataFrame(schema=schema)
    columns = _columns(table, rows)
    try:  # column by column: twice as fast as from row tuples (benchmarks/store_scale.py)
        return pl.DataFrame(dict(zip(schema, columns)), schema=schema)
    except TypeError:  # a value of another type (an int in a str column): converted as rows always were
        return pl.DataFrame([_values(table, r) for r in rows], schema=schema, orient="row")


# Columns of free text or unique ids: Store.write_rows writes them without a dictionary (one
# never pays for them) and without min/max statistics (no filter skips a row group by them);
# every other column (names, statuses, numbers) repeats and gets both.
PLAIN_COLUMNS = frozenset({
    "call_key", "reward_key", "sample_id", "parent_id", "node_id", "response_sha", "request_json", "text",
    "prompt", "response", "chosen", "rejected", "messages", "prompt_messages", "reference", "raw"})


def arrow(table: str, rows: list[Any]) -> tuple[pa.Table, list[str]]:
    """Rows as an Arrow table of the table's exact schema (what `frame` gives, read back the
    same), and the columns worth a dictionary. Straight from the rows to Arrow: building a
    polars frame first cost a quarter more of a shard's write (benchmarks/store_scale.py)."""
    import pyarrow as pa

    schema = _arrow_schema(table)
    dictionary = [c for c in schema.names if c not in PLAIN_COLUMNS]
    if not rows:
        return schema.empty_table(), dictionary
    columns = _columns(table, rows)
    try:
        return pa.Table.from_arrays([pa.array(v, type=f.type) for v, f in zip(columns, schema)], schema=schema), dictionary
    except (pa.ArrowTypeError, pa.ArrowInvalid):  # an int in a str column: converted as frame converts it
        return frame(table, rows).to_arrow().cast(schema), dictionary


@functools.cache
def _arrow_schema(table: str) -> pa.Schema:
    return frame(table, []).to_arrow().schema


def conform(table: str, df: pl.DataFrame) -> pl.DataFrame:
    """A computed frame (joins, group-bys) as the table's rows: its columns in the table's order
    and dtypes (a count comes out of polars as UInt32, the table holds Int64). Helper columns of
    the computation are dropped; a missing column raises RowError."""
    schema = _schema(table)
    missing = [c for c in schema if c not in df.columns]
    if missing:
        raise RowError(f"table {table!r}: missing column(s) {', '.join(map(repr, missing))}")
    return df.select(pl.col(c).cast(dtype) for c, dtype in schema.items())


def keyed(table: str, part: Any, keys: BatchKeys) -> Any:
    """A method's part of a row (e.g. a TreeNode) completed with its keys into the table's row
    class; a part with a field the table lacks, or lacking one it has, raises RowError."""
    _schema(table)
    if not dataclasses.is_dataclass(part) or isinstance(part, type):
        raise RowError(f"table {table!r}: a method's rows are dataclasses, not {type(part).__name__}")
    values = {f.name: getattr(part, f.name) for f in dataclasses.fields(part)}
    try:
        return TABLES[table](**dataclasses.asdict(keys), **values)
    except TypeError as exc:  # unexpected / missing / repeated keyword: a field that does not fit
        raise RowError(f"table {table!r}: {type(part).__name__} does not fit {TABLES[table].__name__}: {exc}") from None


def sample_row(sample: Sample, *, run_id: str, method: str, batch: str, prompt_id: str) -> SampleRow:
    g, s = sample.generation, sample.score
    return SampleRow(
        run_id=run_id, method=method, batch=batch, prompt_id=prompt_id,
        sample_id=g.sample_id, order=sample.order, agent=g.agent,
        action=sample.action, parent_id=sample.parent_id, depth=sample.depth,
        text=g.text, finish_reason=g.finish_reason, prompt_tokens=g.prompt_tokens,
        completion_tokens=g.completion_tokens, latency_s=g.latency_s, cached=g.cached,
        status=g.status, error=g.error, reward=s.value, reward_status=s.status,
        reward_error=s.error,
    )


__all__ = [
    "DTYPES",
    "ERROR",
    "OK",
    "SCHEMAS",
    "SKIPPED",
    "TABLES",
    "BatchKeys",
    "CallRecord",
    "DialogueRecord",
    "DialogueRow",
    "DpoRow",
    "EvolutionRow",
    "EvolveIterationRow",
    "Generation",
    "Message",
    "MethodOutput",
    "PrefixCacheRow",
    "Prompt",
    "PromptRow",
    "RewardRecord",
    "RowError",
    "RunRecord",
    "Sample",
    "SampleRow",
    "Score",
    "SftRow",
    "SkippedRow",
    "TreeNode",
    "TreeNodeRow",
    "ValueTarget",
    "ValueTargetRow",
    "VerdictRow",
    "PLAIN_COLUMNS",
    "arrow",
    "conform",
    "content_key",
    "frame",
    "keyed",
    "sample_row",
    "schema_of",
]
