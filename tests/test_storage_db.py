"""Storage and the SQL views, against real Parquet files and a real DuckDB database."""

from __future__ import annotations

import os

import duckdb
import pytest

from toa.db import connect, create_views, database_path, query
from toa.rows import SCHEMAS, frame
from toa.storage import ShardWriter, Store


def call(key, status="ok", created=1.0, prompt="p"):
    return {"call_key": key, "prompt_id": prompt, "agent": "a", "model": "m", "request_json": "{}", "seed": 1,
            "slot": 0, "text": "t" if status == "ok" else None, "prompt_tokens": 3, "completion_tokens": 4,
            "latency_s": 0.1, "status": status, "error": None if status == "ok" else "boom", "created_at": created,
            "finish_reason": "stop" if status == "ok" else None, "logprob": None}


def test_write_is_atomic_and_leaves_no_temporaries(tmp_path):
    store = Store(str(tmp_path))
    store.write_rows("calls", [call("k1")], "batch=b", "x.parquet")
    assert sorted(os.listdir(tmp_path / "calls" / "batch=b")) == ["x.parquet"]
    assert store.read("calls", "batch=b")["call_key"].to_list() == ["k1"]


def test_every_table_has_a_view_even_before_data(tmp_path):
    store = Store(str(tmp_path))
    con = connect(store)
    for table in SCHEMAS:
        assert con.execute(f"select count(*) from {table}").fetchone() == (0,)
    assert database_path(store) == tmp_path / "toa.duckdb"


def test_calls_view_deduplicates_keeping_the_success(tmp_path):
    store = Store(str(tmp_path))
    writer = ShardWriter(store, "calls", "batch=b", flush_rows=2)
    for row in [call("k1", "error", 1.0), call("k1", "ok", 2.0), call("k2"), call("k2")]:  # k2 twice: a re-written shard
        writer.append(row)
    writer.flush()
    df = query(store, "select call_key, status from calls order by call_key")
    assert df.rows() == [("k1", "ok"), ("k2", "ok")]
    attempts = query(store, "select count(*) as n from call_attempts where call_key = ?", ["k1"])
    assert attempts["n"][0] == 2  # the failed attempt is still there to count


def test_a_part_written_in_the_background_that_fails_raises_at_flush_and_keeps_its_rows(tmp_path, monkeypatch):
    store = Store(str(tmp_path))
    writer = ShardWriter(store, "calls", "batch=b", flush_rows=2)

    def full_disk(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store, "write_rows", full_disk)
    writer.append(call("k1"))
    writer.append(call("k2"))  # due: handed to a writer thread, which fails
    with pytest.raises(OSError, match="No space left"):
        writer.flush()
    monkeypatch.undo()
    assert ShardWriter(store, "calls", "batch=b").recover() == 0  # the next writer already took the journal
    assert sorted(store.read("calls", "batch=b")["call_key"].to_list()) == ["k1", "k2"]


def test_method_summary_from_samples(tmp_path):
    store = Store(str(tmp_path))
    rows = []
    for method, rewards in (("random", [0.2, 0.4, None]), ("parallel_ensemble", [0.9, 0.1, 0.5])):
        for i, r in enumerate(rewards):
            rows.append({"run_id": "r1", "method": method, "batch": "b", "prompt_id": "p", "sample_id": f"{method}{i}",
                         "order": i, "agent": "a", "action": "a", "prompt_tokens": 10, "completion_tokens": 5,
                         "status": "ok" if r is not None else "error", "reward": r,
                         "reward_status": "ok" if r is not None else "error", "parent_id": None, "depth": 0,
                         "text": "t", "finish_reason": "stop", "latency_s": 0.1, "cached": False, "error": None,
                         "reward_error": None})
    store.write_frame(frame("samples", rows), store.path("samples", "run=r1", "b.parquet"))
    out = {r["method"]: r for r in query(store, "select * from method_summary where run_id = ?", ["r1"]).to_dicts()}
    assert out["random"]["best_reward"] == pytest.approx(0.4) and out["random"]["mean_reward"] == pytest.approx(0.3)
    assert out["random"]["generation_errors"] == 1 and out["random"]["generations"] == 3
    assert out["parallel_ensemble"]["best_reward"] == pytest.approx(0.9)
    assert out["parallel_ensemble"]["completion_tokens"] == 15


def test_root_with_quote_in_path_is_safe(tmp_path):
    root = tmp_path / "it's here"
    store = Store(str(root))
    store.write_rows("calls", [call("k1")], "batch=b", "x.parquet")
    assert query(store, "select count(*) as n from calls")["n"][0] == 1


def test_unwritable_root_fails_before_any_work(tmp_path):
    # (Running as root ignores permission bits, so the root sits below a regular file instead.)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises((NotADirectoryError, FileExistsError, PermissionError)):
        Store(str(blocker / "results")).init_tables()


def test_local_dir_is_inside_a_local_root_and_beside_the_cwd_for_a_remote_one(tmp_path, monkeypatch):
    assert Store(str(tmp_path)).local_dir("reports", "run=r1") == f"{tmp_path}/reports/run=r1"
    monkeypatch.chdir(tmp_path)
    assert Store("memory://bucket/results").local_dir("reports", "run=r1") == f"{tmp_path}/toa-reports/run=r1"


def _unions(store) -> dict[str, bool]:
    """Per table view of the database file: whether it unions its shards by name."""
    con = duckdb.connect(str(database_path(store)), read_only=True)
    try:
        return {name: "union_by_name = true" in sql for name, sql in
                con.execute("select view_name, sql from duckdb_views() where not internal").fetchall() if name in SCHEMAS}
    finally:
        con.close()


def test_only_a_table_with_an_older_shard_is_read_by_name(tmp_path):
    """Views bind from one shard when all of a table's shards have its columns (binding with
    union_by_name reads every shard's footer, per query); a shard written before a column was
    added keeps union_by_name for its table, and reads that column as null."""
    store = Store(str(tmp_path))
    store.write_rows("calls", [call("k1")], "batch=b", "new.parquet")
    create_views(store)
    assert not any(_unions(store).values())
    older = frame("calls", [call("k0", created=0.5)]).drop("logprob")
    store.write_frame(older, store.path("calls", "batch=b", "old.parquet"))
    create_views(store)
    assert [t for t, union in _unions(store).items() if union] == ["calls"]
    both = "select call_key, logprob from calls order by call_key"
    assert query(store, both).rows() == [("k0", None), ("k1", None)]  # the database file's views
    database_path(store).unlink()
    assert query(store, both).rows() == [("k0", None), ("k1", None)]  # views built in memory


@pytest.mark.parametrize("form", ["{tmp}/results", "{tmp}/results/", "results", "results/sub/", "./results", ".", "./"])
def test_a_plain_local_root_is_the_one_fsspec_makes(tmp_path, monkeypatch, form):
    """A plain path is resolved without importing fsspec (`toa sql` answers faster), to the same
    root fsspec gives; its filesystem is fsspec's local one."""
    import fsspec
    from fsspec.implementations.local import LocalFileSystem

    monkeypatch.chdir(tmp_path)
    url = form.format(tmp=tmp_path)
    store = Store(url)
    assert store.local and store.root == fsspec.core.url_to_fs(url)[1].rstrip("/")
    assert isinstance(store.fs, LocalFileSystem)


def test_a_root_written_before_a_table_gained_columns_gets_views_over_all_of_them(tmp_path):
    """An older toa wrote calls' empty schema shard without server_s/request_choices; the views
    that read those columns (sql/cost.sql) must still bind on that root."""
    import polars as pl

    from toa.db import create_views, query
    from toa.rows import frame

    store = Store(str(tmp_path))
    store.init_tables()
    store.write_frame(frame("calls", []).drop(["server_s", "request_choices"]), store.path("calls", "_schema.parquet"))
    create_views(store)
    assert {"server_s", "request_choices"} <= set(pl.read_parquet_schema(store.path("calls", "_schema.parquet")))
    assert query(store, "select count(*) as n from method_cost")["n"][0] == 0
