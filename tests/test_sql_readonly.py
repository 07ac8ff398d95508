"""Queries only read: `toa sql` on a results root the user cannot write, against a real DuckDB
file; and every SQL text the code runs lives in sql/ (loaded by toa.sql)."""

from __future__ import annotations

import ast
import hashlib
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest
from helpers import write_run  # the hand-built run the views are tested on

from toa import cli
from toa.db import connect, create_views, database_path, query
from toa.storage import Store

ROOT = Path(__file__).resolve().parents[1]
N_SAMPLES = 11  # rows write_run puts in `samples`


@pytest.fixture
def written(tmp_path):
    """A results root as a run leaves it: shards, and the database with its views."""
    store = Store(str(tmp_path / "results"))
    write_run(store)
    create_views(store)
    return store


@pytest.fixture
def connects(monkeypatch):
    """Every duckdb.connect as (database, read_only)."""
    seen, real = [], duckdb.connect

    def spy(database=":memory:", read_only=False, **kw):
        seen.append((str(database), read_only))
        return real(database, read_only=read_only, **kw)

    monkeypatch.setattr(duckdb, "connect", spy)
    return seen


def snapshot(root: Path) -> dict[str, tuple[str, int]]:
    return {str(f.relative_to(root)): (hashlib.sha256(f.read_bytes()).hexdigest(), f.stat().st_mtime_ns)
            for f in sorted(root.rglob("*")) if f.is_file()}


def toa_sql_read_only(root: Path, sql: str, capsys) -> str:
    """`toa sql` with write permission taken from the whole root (put back afterwards, so the
    tmp folder can be removed). Running as root ignores permission bits: the callers check that
    nothing was written and that DuckDB was opened read-only instead."""
    paths = [root, *root.rglob("*")]
    modes = {p: p.stat().st_mode for p in paths}
    try:
        for p in paths:
            p.chmod(modes[p] & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
        capsys.readouterr()
        cli.main(["sql", "--root", str(root), sql])
        return capsys.readouterr().out
    finally:
        for p in reversed(paths):
            p.chmod(modes[p])


def test_toa_sql_reads_the_database_file_read_only(written, connects, capsys):
    root = Path(written.root)
    before = snapshot(root)
    out = toa_sql_read_only(root, "select count(*) as n from samples", capsys)
    assert re.search(rf"\b{N_SAMPLES}\b", out)
    assert connects == [(str(database_path(written)), True)]  # the file, read-only, no view DDL re-run
    assert snapshot(root) == before


def test_the_query_connection_refuses_writes(written):
    con = connect(written)
    try:
        assert con.execute("select current_database()").fetchall() == [("toa",)]
        with pytest.raises(duckdb.Error, match="read-only"):
            con.execute("create or replace view x as select 1")
    finally:
        con.close()


def test_toa_sql_without_a_database_file_builds_views_in_memory(written, connects, capsys):
    root = Path(written.root)
    database_path(written).unlink()
    before = snapshot(root)
    out = toa_sql_read_only(root, "select count(*) as n from samples", capsys)
    assert re.search(rf"\b{N_SAMPLES}\b", out)
    assert connects == [(":memory:", False)]
    assert snapshot(root) == before and not database_path(written).exists()


def test_a_database_with_other_view_definitions_is_not_used(written, connects):
    """A file an older toa wrote (here: one stale view, no stamp): queries see this toa's views."""
    path = database_path(written)
    path.unlink()
    con = duckdb.connect(str(path))
    con.execute("create view samples as select 1 as stale")
    con.close()
    before = snapshot(Path(written.root))
    connects.clear()
    summary = query(written, "select method, generations from method_summary where run_id = ? order by method", ["run1"])
    assert summary.rows() == [("random", 6), ("toa", 4)]  # the stale view has no such columns
    assert connects[-1] == (":memory:", False) and snapshot(Path(written.root)) == before


def test_a_root_missing_table_folders_answers_with_empty_tables(tmp_path):
    """Written without init_tables (an older toa, or a root only partly copied): no view DDL can
    bind the missing tables, yet every view answers and nothing is written."""
    store = Store(str(tmp_path))
    write_run(store)
    before = snapshot(tmp_path)
    assert query(store, "select count(*) as n from samples")["n"][0] == N_SAMPLES
    assert query(store, "select count(*) as n from verdicts")["n"][0] == 0  # never written here
    assert query(store, "select count(*) as n from evolve_iterations")["n"][0] == 0
    assert query(store, "select count(*) as n from method_summary where run_id = ?", ["run1"])["n"][0] == 2
    assert snapshot(tmp_path) == before


def test_create_views_then_a_new_shard_is_visible_without_rewriting_the_file(written):
    before = database_path(written).read_bytes()
    write_run(written, "run2")
    assert query(written, "select count(distinct run_id) as n from samples")["n"][0] == 2
    assert database_path(written).read_bytes() == before


# What `toa sql` must not load: the config and the methods (~0.7 s of imports), Prefect, the
# servers, polars and pyarrow (DuckDB prints the result itself), fsspec (not for a plain local root).
NOT_FOR_SQL = ("toa.config", "toa.methods", "toa.servers", "toa.supervise", "prefect", "polars", "pyarrow", "httpx",
               "fsspec")


def _toa_sql(args: list[str], cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`toa sql` counting the samples in a fresh interpreter, as the `toa` command starts (no
    TOA_* variable but those in `env`); its last line lists the NOT_FOR_SQL modules it loaded."""
    script = "\n".join([
        "import sys",
        "from toa.cli import main",
        f"main(['sql', 'select count(*) as n from samples', *{args!r}])",
        f"print([m for m in sys.modules if any(m == n or m.startswith(n + '.') for n in {NOT_FOR_SQL!r})])",
    ])
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TOA_")}
    return subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, cwd=cwd,
                          env={**clean, **(env or {})})


def test_toa_sql_with_a_root_imports_only_what_a_query_needs(written):
    """`toa sql --root` answers in well under a second: it loads DuckDB and the views' code,
    nothing else."""
    out = _toa_sql(["--root", written.root])
    assert out.returncode == 0, out.stderr
    assert re.search(rf"\b{N_SAMPLES}\b", out.stdout)
    assert out.stdout.splitlines()[-1] == "[]"


def test_toa_sql_without_root_reads_the_results_fields_alone(written, tmp_path):
    """Without --root, `toa sql` finds the root as a run would (run file < TOA_* environment)
    from the config's results fields alone: nothing else of the config is validated (this run
    file names an unknown method) or imported."""
    run_file = tmp_path / "run.toml"
    run_file.write_text(f'methods = ["no_such_method"]\nresults_root = {written.root!r}\n')
    from_file = _toa_sql(["--config", str(run_file)], tmp_path)
    assert from_file.returncode == 0, from_file.stderr
    assert re.search(rf"\b{N_SAMPLES}\b", from_file.stdout)
    assert from_file.stdout.splitlines()[-1] == "[]"

    run_file.write_text('results_root = "elsewhere"\n')  # the environment wins over the file
    from_env = _toa_sql(["--config", str(run_file)], tmp_path, {"TOA_RESULTS_ROOT": written.root})
    assert from_env.returncode == 0, from_env.stderr
    assert re.search(rf"\b{N_SAMPLES}\b", from_env.stdout)

    run_file.write_text("results_root = 3\n")
    bad = _toa_sql(["--config", str(run_file)], tmp_path)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "results_root" in bad.stderr and str(run_file) in bad.stderr


# -- no SQL outside sql/ ---------------------------------------------------------------------
SQL_TEXT = re.compile(r"(?is)^\s*(select|with|create|insert|update|delete)\b.*\bfrom\b")


def _strings(tree: ast.AST):
    """String constants, and f-strings with each placeholder shown as {}."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node.lineno, node.value
        elif isinstance(node, ast.JoinedStr):
            yield node.lineno, "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)


def test_no_python_file_holds_sql_text():
    files = [p for d in ("src", "flows", "tasks", "blocks") for p in (ROOT / d).rglob("*.py")]
    assert len(files) > 20
    found = [f"{f.relative_to(ROOT)}:{line}: {text.strip()[:60]}" for f in files
             for line, text in _strings(ast.parse(f.read_text(encoding="utf-8"))) if SQL_TEXT.match(text)]
    assert found == [], "SQL belongs in sql/queries/ (toa.sql.query_text)"
