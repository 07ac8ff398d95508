"""The DuckDB database users query: views (sql/*.sql) over the Parquet shards of a results root.

The database file holds only view definitions, so it never goes stale: a new shard is visible
to the next query. It sits in the results root when that is a local folder; for a remote root
(s3://, gs://, ...) it lives in ${TOA_HOME:-~/.cache/toa}/duckdb/ and the root's fsspec
filesystem is registered on every connection, with a listing cache that lives as long as the
connection (Store.snapshot_fs): a query sees the shards there were when it began.

Writers create the views (create_views, called where a run is recorded: tasks/report.py);
queries only read (connect, query): they open the file read-only, or, when it is missing, locked
or holds other view definitions than this toa's (sql/stamp.sql), build the views in an
in-memory database. So a results root the user can only read can still be queried.

The views in the file read a table without union_by_name when, at create_views, all its shards
had the table's columns (so a query opens each shard once, not twice). A shard with fewer
columns written after that (by an older toa, or copied in) makes queries of that table fail
with DuckDB's "schema mismatch" until the next create_views (every run makes one).
"""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import duckdb

from toa.sql import load as load_sql
from toa.sql import query_text
from toa.storage import Store, toa_home

if TYPE_CHECKING:
    import polars as pl

# polars and toa.rows are imported where a result becomes a DataFrame or a table's schema is
# needed: `toa sql` reads a current database file with neither (see toa.storage).

VIEW_FILES = ("tables", "summary", "analysis", "evolve", "accuracy", "compare", "cost")
log = logging.getLogger(__name__)


def database_path(store: Store) -> Path:
    if store.local:
        return Path(store.root) / "toa.duckdb"
    return toa_home() / "duckdb" / f"{hashlib.sha256(store.url.encode()).hexdigest()[:16]}.duckdb"


def _literal(text: str) -> str:
    """A SQL string literal. Only for the root path inside view DDL, which cannot take bound
    parameters; every query with values binds them (see query())."""
    return "'" + text.replace("'", "''") + "'"


def _root_for_sql(store: Store) -> str:
    return store.root if store.local else f"{store.fs.protocol if isinstance(store.fs.protocol, str) else store.fs.protocol[0]}://{store.root}"


def view_ddl(store: Store, uniform: set[str] | frozenset[str] = frozenset()) -> str:
    """Every view definition for this root, in dependency order. The tables in `uniform` (see
    _uniform_tables) are read without union_by_name."""
    root = _literal(_root_for_sql(store))
    ddl = "\n".join(load_sql(name).replace("{root}", root) for name in VIEW_FILES)
    return _UNION.sub(lambda m: m[1] + ("false" if m[2] in uniform else "true"), ddl)


def _uniform_tables(con: duckdb.DuckDBPyConnection, store: Store) -> set[str]:
    """The tables whose every shard has exactly the table's columns, each of one type: their
    views need no union_by_name, so a query binds them from one shard instead of all of them
    (~0.3 ms a shard, per view named). On any error: none (union_by_name everywhere, as safe)."""
    from toa.rows import SCHEMAS

    root = _root_for_sql(store)
    try:
        shards = con.execute(query_text("shard_columns"), [[f"{root}/{t}/**/*.parquet" for t in SCHEMAS]]).fetchall()
    except duckdb.Error as exc:  # e.g. a table folder without shards (a root older toa wrote)
        log.info("shard schemas of %s not read (%s); views union every shard by name", store.url, exc)
        return set()
    kinds: dict[str, set[tuple[str, ...]]] = {}  # table: the distinct column lists of its shards
    for file_name, columns in shards:
        table = file_name.removeprefix(root + "/").split("/", 1)[0]
        kinds.setdefault(table, set()).add(tuple(columns))
    names = {table: sorted(schema) for table, schema in SCHEMAS.items()}  # the shard query sorts by name
    return {table for table, seen in kinds.items()
            if len(seen) == 1 and [c.split(" ", 1)[0] for c in seen.pop()] == names.get(table)}


def _stamp(ddl: str) -> str:
    return hashlib.sha256(ddl.encode()).hexdigest()[:16]


def _open(store: Store, database: str, read_only: bool) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect(database, read_only=read_only)
    if not store.local:
        con.register_filesystem(store.snapshot_fs())  # folders listed once per connection
    return con


def create_views(store: Store) -> Path:
    """Create (or refresh) the views in the results database; for whoever writes results. Raises
    ResultsRootNotWritable on a root it cannot write. A database file held open by another
    process is left as it is (queries then build the views in memory)."""
    store.init_tables()  # a view binds only when its table has a shard: the empty schema shard
    path = database_path(store)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        con = _open(store, str(path), read_only=False)
    except duckdb.Error as exc:
        log.warning("views in %s not updated (%s); queries build them in memory meanwhile", path, exc)
        return path
    try:
        con.execute(view_ddl(store, _uniform_tables(con, store)))
        # stamped with the definitions as written in sql/, before the union_by_name choice: a
        # reader compares them without reading any shard
        con.execute(load_sql("stamp").replace("{stamp}", _literal(_stamp(view_ddl(store)))))
    finally:
        con.close()
    return path


def connect(store: Store) -> duckdb.DuckDBPyConnection:
    """A read-only connection with every view: the database file when its views are this toa's,
    else an in-memory database with the views built there. Writes nothing anywhere."""
    return _open_current(store, _stamp(view_ddl(store))) or _in_memory(store)


def _open_current(store: Store, stamp: str) -> duckdb.DuckDBPyConnection | None:
    path = database_path(store)
    if not path.exists():
        return None
    try:
        con = _open(store, str(path), read_only=True)
    except duckdb.Error:  # locked by a writer, or not a DuckDB file
        return None
    try:
        if con.execute(query_text("views_stamp")).fetchall() == [(stamp,)]:
            return con
    except duckdb.Error:  # no stamp: an older toa wrote the file
        pass
    con.close()
    return None


def _in_memory(store: Store) -> duckdb.DuckDBPyConnection:
    con = _open(store, ":memory:", read_only=False)  # in memory: needs no write permission
    # every shard's footer read once here, rather than by each view bound over it below
    for statement in con.extract_statements(view_ddl(store, _uniform_tables(con, store))):
        try:
            con.execute(statement)
        except duckdb.IOException as exc:
            _stand_in(con, statement.query, exc)
    return con


_VIEW = re.compile(r"(?i)\bCREATE\s+OR\s+REPLACE\s+VIEW\s+(\w+)")
_FOLDER = re.compile(r"'/(\w+)/\*\*/\*\.parquet'")  # how the view files name a table's shards
# How they read a table: union_by_name, so that shards written before a column was added read it
# as null. It costs a read of every shard's footer each time a query names the view.
_UNION = re.compile(r"('/(\w+)/\*\*/\*\.parquet', union_by_name = )true")


def _stand_in(con: duckdb.DuckDBPyConnection, statement: str, exc: duckdb.IOException) -> None:
    """A view over a table folder that holds no shard (a root written by an older toa, or only
    partly): an empty table of that table's schema answers under the view's name instead."""
    from toa.rows import SCHEMAS, frame

    view, folder = _VIEW.search(statement), _FOLDER.search(statement)
    if "No files found" not in str(exc) or not view or not folder or folder[1] not in SCHEMAS:
        raise exc
    con.register(view[1], frame(folder[1], []).to_arrow())


def query(store: Store, sql: str, params: list[Any] | dict[str, Any] | None = None):
    """Run one query (values bound, never formatted in) on a read-only connection and return a
    polars DataFrame."""
    con = connect(store)
    try:
        return _polars(con.sql(sql, params=params or None))
    finally:
        con.close()


def _polars(result: duckdb.DuckDBPyRelation | None) -> pl.DataFrame:
    """A result as a polars DataFrame through the Arrow C stream interface, which needs no
    pyarrow (importing it is a third of a `toa sql`). Polars takes no INTERVAL that way (it
    would panic); such a result goes through pyarrow, which raises polars' plain error."""
    import polars as pl

    if result is not None and any("INTERVAL" in str(t) for t in result.types):
        return result.pl()
    return pl.DataFrame(result)
