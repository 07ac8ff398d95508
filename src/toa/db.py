"""The DuckDB database users query: views (sql/*.sql) over the Parquet shards of a results root.

The database file holds only view definitions, so it never goes stale: a new shard is visible
to the next query. It sits in the results root when that is a local folder; for a remote root
(s3://, gs://, ...) it lives in ${TOA_HOME:-~/.cache/toa}/duckdb/ and the root's fsspec
filesystem is registered on every connection.

Writers create the views (create_views, called where a run is recorded: tasks/report.py);
queries only read (connect, query): they open the file read-only, or, when it is missing, locked
or holds other view definitions than this toa's (sql/stamp.sql), build the views in an
in-memory database. So a results root the user can only read can still be queried.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path
from typing import Any

import duckdb

from toa.rows import SCHEMAS, frame
from toa.sql import load as load_sql
from toa.sql import query_text
from toa.storage import Store

VIEW_FILES = ("tables", "summary", "analysis", "evolve", "accuracy")
log = logging.getLogger(__name__)


def database_path(store: Store) -> Path:
    if store.local:
        return Path(store.root) / "toa.duckdb"
    home = Path(os.environ.get("TOA_HOME", Path.home() / ".cache" / "toa"))
    return home / "duckdb" / f"{hashlib.sha256(store.url.encode()).hexdigest()[:16]}.duckdb"


def _literal(text: str) -> str:
    """A SQL string literal. Only for the root path inside view DDL, which cannot take bound
    parameters; every query with values binds them (see query())."""
    return "'" + text.replace("'", "''") + "'"


def _root_for_sql(store: Store) -> str:
    return store.root if store.local else f"{store.fs.protocol if isinstance(store.fs.protocol, str) else store.fs.protocol[0]}://{store.root}"


def view_ddl(store: Store) -> str:
    """Every view definition for this root, in dependency order."""
    root = _literal(_root_for_sql(store))
    return "\n".join(load_sql(name).replace("{root}", root) for name in VIEW_FILES)


def _stamp(ddl: str) -> str:
    return hashlib.sha256(ddl.encode()).hexdigest()[:16]


def _open(store: Store, database: str, read_only: bool) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect(database, read_only=read_only)
    if not store.local:
        con.register_filesystem(store.fs)
    return con


def create_views(store: Store) -> Path:
    """Create (or refresh) the views in the results database; for whoever writes results. Raises
    ResultsRootNotWritable on a root it cannot write. A database file held open by another
    process is left as it is (queries then build the views in memory)."""
    store.init_tables()  # a view binds only when its table has a shard: the empty schema shard
    path = database_path(store)
    path.parent.mkdir(parents=True, exist_ok=True)
    ddl = view_ddl(store)
    try:
        con = _open(store, str(path), read_only=False)
    except duckdb.Error as exc:
        log.warning("views in %s not updated (%s); queries build them in memory meanwhile", path, exc)
        return path
    try:
        con.execute(ddl)
        con.execute(load_sql("stamp").replace("{stamp}", _literal(_stamp(ddl))))
    finally:
        con.close()
    return path


def connect(store: Store) -> duckdb.DuckDBPyConnection:
    """A read-only connection with every view: the database file when its views are this toa's,
    else an in-memory database with the views built there. Writes nothing anywhere."""
    ddl = view_ddl(store)
    return _open_current(store, _stamp(ddl)) or _in_memory(store, ddl)


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


def _in_memory(store: Store, ddl: str) -> duckdb.DuckDBPyConnection:
    con = _open(store, ":memory:", read_only=False)  # in memory: needs no write permission
    for statement in con.extract_statements(ddl):
        try:
            con.execute(statement)
        except duckdb.IOException as exc:
            _stand_in(con, statement.query, exc)
    return con


_VIEW = re.compile(r"(?i)\bCREATE\s+OR\s+REPLACE\s+VIEW\s+(\w+)")
_FOLDER = re.compile(r"'/(\w+)/\*\*/\*\.parquet'")  # how the view files name a table's shards


def _stand_in(con: duckdb.DuckDBPyConnection, statement: str, exc: duckdb.IOException) -> None:
    """A view over a table folder that holds no shard (a root written by an older toa, or only
    partly): an empty table of that table's schema answers under the view's name instead."""
    view, folder = _VIEW.search(statement), _FOLDER.search(statement)
    if "No files found" not in str(exc) or not view or not folder or folder[1] not in SCHEMAS:
        raise exc
    con.register(view[1], frame(folder[1], []).to_arrow())


def query(store: Store, sql: str, params: list[Any] | dict[str, Any] | None = None):
    """Run one query (values bound, never formatted in) on a read-only connection and return a
    polars DataFrame."""
    con = connect(store)
    try:
        return con.sql(sql, params=params or None).pl()
    finally:
        con.close()
