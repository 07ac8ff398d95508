"""Results storage: Parquet shards under a results root given as an fsspec URL.

Layout (one folder per table, see rows.SCHEMAS):
    <root>/<table>/<partition path>/<file>.parquet

Every write is atomic per shard: on a local disk the shard is written to a temporary name and
renamed; on object stores (s3://, gs://) a PUT is already all-or-nothing. A kill at any moment
therefore leaves whole shards or nothing, and readers that deduplicate by content key (the
views in sql/) never see a duplicate row. Shards let many workers on many machines write
without a single-writer lock; DuckDB (toa.db) gives users one place to query them.
"""

from __future__ import annotations

import io
import json
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import fsspec
import polars as pl
from fsspec.implementations.local import LocalFileSystem

from toa.rows import SCHEMAS, frame

SCHEMA_SHARD = "_schema.parquet"  # an empty shard per table so views work before any data


class Store:
    def __init__(self, root_url: str, storage_options: dict[str, Any] | None = None):
        self.url = root_url
        self.fs, self.root = fsspec.core.url_to_fs(root_url, **(storage_options or {}))
        self.root = self.root.rstrip("/")
        self.local = isinstance(self.fs, LocalFileSystem)

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def local_dir(self, *parts: str) -> str:
        """A folder for files written by local tools (server logs, reports, exports): inside
        the results root when that is a local disk, else ./toa-<first part>/... here."""
        if self.local:
            return self.path(*parts)
        return str(Path.cwd() / f"toa-{parts[0]}" / Path(*parts[1:]))

    def init_tables(self) -> None:
        """Create every table folder with its empty schema shard; fails early on a root
        without write permission, before any model call is made."""
        for table in SCHEMAS:
            target = self.path(table, SCHEMA_SHARD)
            if not self.fs.exists(target):
                self.write_frame(frame(table, []), target)

    # -- writing ---------------------------------------------------------------------------
    def write_frame(self, df: pl.DataFrame, target: str) -> str:
        buf = io.BytesIO()
        df.write_parquet(buf, compression="zstd")
        self._put(buf.getvalue(), target)
        return target

    def write_rows(self, table: str, rows: list[Any], *parts: str) -> str:
        return self.write_frame(frame(table, rows), self.path(table, *parts))

    def write_json(self, obj: Any, *parts: str) -> None:
        self.write_bytes(json.dumps(obj, indent=1, default=str).encode(), *parts)

    def write_bytes(self, data: bytes, *parts: str) -> None:
        self._put(data, self.path(*parts))

    def _put(self, data: bytes, target: str) -> None:
        parent = target.rsplit("/", 1)[0]
        self.fs.makedirs(parent, exist_ok=True)
        if not self.local:
            self.fs.pipe_file(target, data)  # object stores: one PUT, visible whole or not at all
            return
        tmp = f"{target}.{uuid.uuid4().hex}.tmp"
        with self.fs.open(tmp, "wb") as fh:
            fh.write(data)
        self.fs.mv(tmp, target)  # rename on the same disk: atomic

    # -- reading ---------------------------------------------------------------------------
    def exists(self, *parts: str) -> bool:
        return self.fs.exists(self.path(*parts))

    def read_json(self, *parts: str) -> Any:
        with self.fs.open(self.path(*parts), "rb") as fh:
            return json.load(fh)

    def files(self, table: str, *parts: str) -> list[str]:
        base = self.path(table, *parts)
        if not self.fs.exists(base):
            return []
        if self.fs.isfile(base):
            return [base]
        found = self.fs.glob(base + "/**/*.parquet")
        return sorted(f for f in found if not f.endswith(".tmp"))

    def read(self, table: str, *parts: str) -> pl.DataFrame:
        """Every shard below <table>/<parts...>, concatenated with the table's schema."""
        frames = []
        for f in self.files(table, *parts):
            with self.fs.open(f, "rb") as fh:
                frames.append(pl.read_parquet(fh))
        if not frames:
            return frame(table, [])
        return pl.concat(frames, how="diagonal_relaxed").select(list(SCHEMAS[table]))


class ShardWriter:
    """Buffers rows of one table and writes them as part files, so that a crash loses at most
    the rows not yet flushed (bounded by `flush_rows` and `flush_s`). Thread-safe: the request
    layer appends from the event loop, the flushing may happen from the task thread."""

    def __init__(self, store: Store, table: str, *parts: str, flush_rows: int = 256, flush_s: float = 2.0):
        self.store, self.table, self.parts = store, table, parts
        self.flush_rows, self.flush_s = flush_rows, flush_s
        self._rows: list[Any] = []
        self._lock = threading.Lock()
        self._last = time.monotonic()
        self.written = 0

    def append(self, row: Any) -> None:
        with self._lock:
            self._rows.append(row)
            due = len(self._rows) >= self.flush_rows or time.monotonic() - self._last >= self.flush_s
        if due:
            self.flush()

    def flush(self) -> None:
        with self._lock:
            rows, self._rows = self._rows, []
            self._last = time.monotonic()
        if rows:
            self.store.write_rows(self.table, rows, *self.parts, f"part-{uuid.uuid4().hex}.parquet")
            self.written += len(rows)
