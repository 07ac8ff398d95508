"""The DuckDB database users query: views (sql/*.sql) over the Parquet shards of a results root.

The database file holds only view definitions, so it never goes stale: a new shard is visible
to the next query. It sits in the results root when that is a local folder; for a remote root
(s3://, gs://, ...) it lives in ${TOA_HOME:-~/.cache/toa}/duckdb/ and the root's fsspec
filesystem is registered on every connection.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import duckdb

from toa.sql import load as load_sql
from toa.storage import Store

VIEW_FILES = ("tables", "summary", "analysis", "evolve", "accuracy")


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


def connect(store: Store, read_only: bool = False) -> duckdb.DuckDBPyConnection:
    """Open the results database, creating or refreshing its views when writable."""
    path = database_path(store)
    path.parent.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect(str(path), read_only=read_only and path.exists())
    if not store.local:
        con.register_filesystem(store.fs)
    if not (read_only and path.exists()):
        store.init_tables()
        root = _literal(_root_for_sql(store))
        for name in VIEW_FILES:
            con.execute(load_sql(name).replace("{root}", root))
    return con


def query(store: Store, sql: str, params: list[Any] | dict[str, Any] | None = None):
    """Run one query (values bound, never formatted in) and return a polars DataFrame."""
    con = connect(store)
    try:
        return con.sql(sql, params=params or None).pl()
    finally:
        con.close()
