"""The row vocabulary: one typed row class per table, schemas derived from them, and writes
that refuse a row with an unknown or missing column. Real Parquet and a real DuckDB, no server."""

from __future__ import annotations

import dataclasses
import gc

import polars as pl
import pytest

from toa.db import connect
from toa.rows import (
    SCHEMAS,
    TABLES,
    DialogueRecord,
    DialogueRow,
    MethodOutput,
    Prompt,
    PromptRow,
    RowError,
    TreeNode,
    TreeNodeRow,
    ValueTarget,
    arrow,
    conform,
    frame,
    schema_of,
)
from toa.storage import Store

S, I, F, B = pl.Utf8, pl.Int64, pl.Float64, pl.Boolean
KEYS = {"run_id": S, "method": S, "batch": S, "prompt_id": S}  # what the engine adds to a method's rows

# Written out on purpose, not derived: stored shards, the SQL views and the exports read these
# names, dtypes and orders, so a change to a row class must show up here as a diff.
EXPECTED = {
    "calls": {"call_key": S, "prompt_id": S, "agent": S, "model": S, "request_json": S, "seed": I, "slot": I,
              "text": S, "finish_reason": S, "prompt_tokens": I, "completion_tokens": I, "latency_s": F,
              "status": S, "error": S, "created_at": F, "logprob": F, "server_s": F, "request_choices": I},
    "rewards": {"reward_key": S, "reward_id": S, "prompt_id": S, "response_sha": S, "value": F, "status": S,
                "error": S, "latency_s": F, "created_at": F},
    "samples": {**KEYS, "sample_id": S, "order": I, "agent": S, "action": S, "parent_id": S, "depth": I, "text": S,
                "finish_reason": S, "prompt_tokens": I, "completion_tokens": I, "latency_s": F, "cached": B,
                "status": S, "error": S, "reward": F, "reward_status": S, "reward_error": S},
    "tree_nodes": {**KEYS, "node_id": S, "parent_id": S, "kind": S, "agent": S, "depth": I, "visits": I, "value": F,
                   "n_values": I, "sample_id": S, "created": I},
    "value_targets": {**KEYS, "node_id": S, "parent_id": S, "depth": I, "prompt": S, "state": S, "visits": I,
                      "value": F, "prior": F, "terminal": B},
    "prompts": {"prompt_id": S, "text": S, "reference": S, "source": S, "line": I, "batch": S},
    "skipped_rows": {"source": S, "line": I, "reason": S, "raw": S},
    "runs": {"run_id": S, "started_at": F, "config_json": S, "models_json": S, "reward_id": S},
    "sft": {"run_id": S, "method": S, "prompt_id": S, "prompt": S, "response": S, "agent": S, "action": S,
            "reward": F, "sample_id": S, "n_samples": I, "messages": S},
    "dpo": {"run_id": S, "method": S, "prompt_id": S, "prompt": S, "chosen": S, "rejected": S, "chosen_agent": S,
            "rejected_agent": S, "chosen_reward": F, "rejected_reward": F, "rejected_rank": I, "chosen_id": S,
            "rejected_id": S, "prompt_messages": S},
    "dialogues": {**KEYS, "dialogue_id": S, "mode": S, "speakers": S, "turns": I, "stop_reason": S,
                  "final_answer": S, "correct": F, "tokens": I, "max_loss": F, "reward_kind": S, "reward": F,
                  "reward_status": S, "reward_error": S, "utterance_ids": S},
    "evolutions": {"evolve_id": S, "iteration": I, "from_run_id": S, "prompt_id": S, "parent_prompt_id": S,
                   "root_prompt_id": S, "step": I, "kind": S, "kinds": S, "agent": S, "call_key": S,
                   "reference_call_key": S, "text": S, "reference": S, "status": S, "reason": S, "metric": S,
                   "parent_metric": F},
    "evolve_iterations": {"evolve_id": S, "iteration": I, "run_id": S, "prompts_path": S, "prompts": I,
                          "evolved": I, "selected": I, "created_at": F},
    "verdicts": {"run_id": S, "method": S, "prompt_id": S, "sample_id": S, "answer": S, "correct": B,
                 "verifier": S},
    "prefix_cache": {"run_id": S, "method": S, "batch": S, "agents": S, "queries": F, "hits": F, "started_at": F,
                     "seconds": F},
}

EXAMPLE = {S: "x", I: 2, F: 0.5, B: True}  # a value of each column dtype


def example(table: str, **values):
    """A row of the table's class with every column set (a value of its dtype unless given)."""
    return TABLES[table](**{c: values.get(c, EXAMPLE[d]) for c, d in SCHEMAS[table].items()})


def test_every_table_has_a_row_class_and_its_schema_is_the_expected_one():
    assert list(SCHEMAS) == list(TABLES) == list(EXPECTED)
    for table, cls in TABLES.items():
        assert dataclasses.is_dataclass(cls), table
        assert SCHEMAS[table] == schema_of(cls)
        assert list(SCHEMAS[table].items()) == list(EXPECTED[table].items()), table  # names, dtypes, order


def test_a_misspelled_column_raises_naming_the_table_and_the_column():
    row = dict(example("runs").__dict__)
    row["reward_idd"] = row.pop("reward_id")
    with pytest.raises(RowError, match=r"'runs'.*unknown column\(s\) 'reward_idd'.*missing column\(s\) 'reward_id'"):
        frame("runs", [row])


def test_a_missing_or_extra_column_raises():
    row = dict(example("skipped_rows").__dict__)
    with pytest.raises(RowError, match=r"'skipped_rows'.*missing column\(s\) 'raw'"):
        frame("skipped_rows", [{k: v for k, v in row.items() if k != "raw"}])
    with pytest.raises(RowError, match=r"'skipped_rows'.*unknown column\(s\) 'note'"):
        frame("skipped_rows", [{**row, "note": "n"}])
    assert frame("skipped_rows", [row]).height == 1  # exactly the columns: accepted


def test_a_row_of_another_class_or_an_unknown_table_raises():
    with pytest.raises(RowError, match="'prompts' takes PromptRow rows, not Prompt"):
        frame("prompts", [Prompt("p", "t")])  # a prompt without its batch
    with pytest.raises(RowError, match="unknown table 'sample'"):
        frame("sample", [])


@pytest.mark.parametrize("table", list(TABLES))
def test_a_typed_row_round_trips_through_parquet(tmp_path, table):
    store = Store(str(tmp_path))
    row = example(table)
    store.write_rows(table, [row], "part=a", "x.parquet")
    df = store.read(table, "part=a")
    assert df.schema == pl.Schema(SCHEMAS[table])
    assert [TABLES[table](**r) for r in df.iter_rows(named=True)] == [row]


@pytest.mark.parametrize("table", list(TABLES))
def test_write_rows_by_arrow_reads_back_as_the_polars_frame_of_the_rows(tmp_path, table):
    store = Store(str(tmp_path))
    rows = [example(table), dataclasses.asdict(example(table))]  # a typed row and a dict row
    store.write_rows(table, rows, "by=arrow", "x.parquet")
    store.write_frame(frame(table, rows), store.path(table, "by=polars", "x.parquet"))
    assert store.read(table, "by=arrow").equals(store.read(table, "by=polars"))


def test_typed_rows_over_several_blocks_keep_their_order_and_values(tmp_path):
    store = Store(str(tmp_path))
    rows = [PromptRow(prompt_id=f"p{i}", text=f"text {i}", batch="b", line=i, reference=None if i % 3 else "r")
            for i in range(2500)]  # three blocks of toa.rows._columns, the last one partial
    store.write_rows("prompts", rows, "source=s", "b.parquet")
    assert [PromptRow(**r) for r in store.read("prompts").iter_rows(named=True)] == rows
    assert frame("prompts", rows).equals(store.read("prompts"))


def test_converting_typed_rows_makes_no_object_per_row_for_the_garbage_collector():
    # A tuple per row made the cyclic collector run every 700 rows, each pass over every live
    # row of the process: it doubled a shard's conversion at 10 M rows (benchmarks/store_scale.py).
    rows = [PromptRow(prompt_id=f"p{i}", text=f"text {i}", batch="b", line=i) for i in range(20_000)]
    arrow("prompts", rows[:10])  # pyarrow's first conversion initialises its own objects
    passes = []

    def count(phase, info):
        passes.append(phase == "start")

    gc.collect()
    gc.callbacks.append(count)
    try:
        arrow("prompts", rows)
        frame("prompts", rows)
    finally:
        gc.callbacks.remove(count)
    assert sum(passes) == 0


def test_a_failed_shard_write_leaves_neither_a_temporary_file_nor_a_shard(tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    store = Store(str(tmp_path))
    store.write_rows("prompts", [PromptRow(prompt_id="p", text="old", batch="b")], "source=s", "b.parquet")

    def fail_midway(table, where, **options):  # in-process fake: the file is begun, then the disk fails
        where.write(b"PAR1")
        raise OSError("No space left on device")

    monkeypatch.setattr(pq, "write_table", fail_midway)
    with pytest.raises(OSError, match="No space"):
        store.write_rows("prompts", [PromptRow(prompt_id="p", text="new", batch="b")], "source=s", "b.parquet")
    assert sorted(p.name for p in (tmp_path / "prompts" / "source=s").iterdir()) == ["b.parquet"]
    monkeypatch.undo()
    assert store.read("prompts")["text"].to_list() == ["old"]


def test_write_rows_converts_a_mistyped_value_as_frame_does(tmp_path):
    store = Store(str(tmp_path))
    row = {**dataclasses.asdict(PromptRow(prompt_id="p", text="t", batch="b")), "prompt_id": 7}  # an int id
    store.write_rows("prompts", [row], "source=s", "b.parquet")
    assert store.read("prompts")["prompt_id"].to_list() == frame("prompts", [row])["prompt_id"].to_list() == ["7"]


def test_nulls_round_trip_where_a_column_may_be_null(tmp_path):
    store = Store(str(tmp_path))
    row = PromptRow(prompt_id="p", text="t", batch="b")  # reference: None
    store.write_rows("prompts", [row], "source=s", "b.parquet")
    assert [PromptRow(**r) for r in store.read("prompts").iter_rows(named=True)] == [row]


def test_a_methods_parts_are_completed_with_the_engines_keys():
    node = TreeNode("n0", None, "root", None, 0, 1, 0.5, 1, None, 0)
    dialogue = DialogueRecord(**{c: EXAMPLE[d] for c, d in SCHEMAS["dialogues"].items() if c not in KEYS})
    out = MethodOutput([], [node], {"dialogues": [dialogue]})
    rows = out.table_rows(run_id="r", method="optima", batch="b", prompt_id="p")
    assert rows["tree_nodes"] == [TreeNodeRow("r", "optima", "b", "p", *dataclasses.astuple(node))]
    assert isinstance(rows["dialogues"][0], DialogueRow) and rows["dialogues"][0].prompt_id == "p"
    assert frame("dialogues", rows["dialogues"]).height == 1
    assert MethodOutput([]).table_rows(run_id="r", method="m", batch="b", prompt_id="p") == {}


def test_a_method_part_that_does_not_fit_its_table_raises():
    target = ValueTarget("n1", None, 1, "q", "s", 1, 1.0, 0.5, False)
    with pytest.raises(RowError, match="'dialogues'.*ValueTarget does not fit DialogueRow"):
        MethodOutput([], tables={"dialogues": [target]}).table_rows(run_id="r", method="m", batch="b", prompt_id="p")
    with pytest.raises(RowError, match="'value_targets'.*not dict"):
        MethodOutput([], tables={"value_targets": [{"node_id": "n1"}]}).table_rows(
            run_id="r", method="m", batch="b", prompt_id="p")


def test_conform_orders_and_casts_a_computed_frame_and_names_a_missing_column():
    computed = frame("verdicts", [example("verdicts")]).reverse().with_columns(extra=pl.lit(1))
    assert conform("verdicts", computed).schema == pl.Schema(SCHEMAS["verdicts"])
    counted = frame("sft", [example("sft")]).with_columns(pl.col("n_samples").cast(pl.UInt32))
    assert conform("sft", counted)["n_samples"].dtype == pl.Int64  # polars counts are UInt32
    with pytest.raises(RowError, match="'sft'.*missing column\\(s\\) 'messages'"):
        conform("sft", counted.drop("messages"))


def test_every_view_binds_and_every_table_view_has_the_table_columns(tmp_path):
    """Each view over a table reads its columns (one typed row per table), and every view of
    sql/*.sql binds, so none names a column the row classes do not have."""
    store = Store(str(tmp_path))
    for table in TABLES:
        store.write_rows(table, [example(table)], "part=a", "x.parquet")
    con = connect(store)
    for table, schema in SCHEMAS.items():
        cols = ", ".join(f'"{c}"' for c in schema)
        assert len(con.execute(f"select {cols} from {table}").fetchall()) == 1, table
    views = [name for (name,) in con.execute("select view_name from duckdb_views() where not internal").fetchall()]
    assert set(TABLES) <= set(views)
    for view in views:
        con.execute(f'select * from "{view}" limit 0')  # a view naming a missing column fails to bind here
