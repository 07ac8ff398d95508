"""Results storage: Parquet shards under a results root given as an fsspec URL.

Layout (one folder per table, see rows.SCHEMAS):
    <root>/<table>/<partition path>/<file>.parquet

Every write is atomic per shard: on a local disk the shard is written to a temporary name and
renamed; on object stores (s3://, gs://) a PUT is already all-or-nothing. A kill at any moment
therefore leaves whole shards or nothing, and readers that deduplicate by content key (the
views in sql/) never see a duplicate row. Shards let many workers on many machines write
without a single-writer lock; DuckDB (toa.db) gives users one place to query them.

Call and reward records are also journaled row by row (ShardWriter, docs/design.md §4.2): beside
the shards on a local root, in a local spool for any other root (an object store cannot append):
    ${TOA_HOME:-~/.cache/toa}/spool/<hash of the root>/<table>/<partition path>/journal-<id>.jsonl
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from toa.errors import UserError

if TYPE_CHECKING:
    import polars as pl

# polars and toa.rows (which builds its schemas with polars) are imported where rows are framed,
# written or read, not here: `toa sql` needs a Store only to find the root, and polars was a
# third of its start-up (README, "Speed and memory": select 1 in <= 0.5 s).

try:
    import fcntl  # journal locks (POSIX); without it writers keep only the in-memory buffer
except ImportError:  # pragma: no cover
    fcntl = None

SCHEMA_SHARD = "_schema.parquet"  # an empty shard per table so views work before any data



def toa_home() -> Path:
    """${TOA_HOME:-~/.cache/toa}: toa's own local files (spool, DuckDB files of remote roots)."""
    return Path(os.environ.get("TOA_HOME") or Path.home() / ".cache" / "toa").expanduser()


def spool_root(store: Store) -> Path:
    """The local spool of a non-local root: ${TOA_HOME:-~/.cache/toa}/spool/<16 hex>, hashed
    from the root URL and its endpoint_url (the same bucket name on two S3 servers is two
    roots; credentials are left out, so rotating a key keeps the spool; a trailing slash is the
    same root)."""
    ident = json.dumps([store.url.rstrip("/"), store.endpoint])
    return toa_home() / "spool" / hashlib.sha256(ident.encode()).hexdigest()[:16]


# fsspec option names that hold credentials (s3fs, gcsfs, adlfs, ...): a run config holds their
# values as SecretStr, so they print and serialize masked (runs.config_json, logs, Prefect).
CREDENTIAL_OPTIONS = frozenset({
    "key", "secret", "token", "password", "session_token", "aws_access_key_id", "aws_secret_access_key",
    "aws_session_token", "account_key", "sas_token", "client_secret", "connection_string", "credential",
})


def mask_credentials(options: dict[str, Any]) -> dict[str, Any]:
    """`options` with the values of credential options wrapped in SecretStr (pydantic validator
    of every storage_options field)."""
    from pydantic import SecretStr

    return {k: SecretStr(str(v)) if k in CREDENTIAL_OPTIONS and not isinstance(v, SecretStr) else v
            for k, v in options.items()}


def plain_options(options: dict[str, Any] | None) -> dict[str, Any]:
    """Storage options as fsspec takes them: SecretStr values unwrapped."""
    return {k: v.get_secret_value() if hasattr(v, "get_secret_value") else v for k, v in (options or {}).items()}


class ResultsRootNotWritable(UserError, PermissionError):
    """The results root cannot be written (checked before any model call)."""


def _plain_local_path(url: str) -> str | None:
    """The root fsspec makes of a plain POSIX path (absolute: as it is; relative: below the
    working directory), without importing fsspec, for commands that only query (`toa sql`).
    None for anything fsspec must resolve: a URL or chained URL, `~`, another OS's paths.
    tests/test_storage_db.py checks that the two agree."""
    if not isinstance(url, str) or os.sep != "/" or ":" in url or url.startswith("~"):
        return None
    if not url.startswith("/"):
        url = f"{os.getcwd()}/{'' if url == '.' else url.removeprefix('./')}"
    return url.rstrip("/")


def _endpoint_of(url: str, options: dict[str, Any]) -> str | None:
    """The object-store server a root's options name (s3fs: endpoint_url, top level or in
    client_kwargs; for s3:// else botocore's AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL); None for
    the provider's default."""
    endpoint = options.get("endpoint_url") or (options.get("client_kwargs") or {}).get("endpoint_url")
    if endpoint is None and url.startswith(("s3://", "s3a://")):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return None if endpoint is None else str(endpoint)


class Store:
    def __init__(self, root_url: str, storage_options: dict[str, Any] | None = None):
        self.url = root_url
        self.endpoint = _endpoint_of(root_url, storage_options or {})
        # credentials from a ResultsLocation block arrive as SecretStr (masked in config dumps)
        options = plain_options(storage_options)
        plain = None if options else _plain_local_path(root_url)
        if plain is not None:  # fsspec (~0.05 s to import) is loaded when a file is first touched
            self._fs, self.root, self.local = None, plain, True
            return
        import fsspec
        from fsspec.implementations.local import LocalFileSystem

        # Every listing fresh: shards written by other processes (workers, the next run, a
        # spool recovery) must be seen by the next read or query, never a cached folder list.
        options.setdefault("use_listings_cache", False)
        try:
            self._fs, root = fsspec.core.url_to_fs(root_url, **options)
        except ImportError as exc:  # e.g. s3:// without s3fs: fsspec names the package to install
            raise UserError(f"results_root {root_url!r}: {exc}") from None
        self.root = root.rstrip("/")
        self.local = isinstance(self._fs, LocalFileSystem)

    @property
    def fs(self):
        """The root's fsspec filesystem."""
        if self._fs is None:
            from fsspec.implementations.local import LocalFileSystem

            self._fs = LocalFileSystem()
        return self._fs

    def snapshot_fs(self):
        """The root's filesystem with a listing cache of its own, for one reader (a DuckDB
        connection: one `toa sql` query, one report): each folder is listed once, where the
        shared instance (no listing cache, see __init__) asks the object store again for every
        view bound and every file opened: 106 instead of 784 requests for a report on moto's S3.
        Shards written after its first listing are not seen through it, as in a snapshot."""
        fs = self.fs
        if self.local:
            return fs
        try:
            return type(fs)(*fs.storage_args, **{**fs.storage_options, "use_listings_cache": True,
                                                 "skip_instance_cache": True})
        except TypeError:  # a filesystem that takes no such options: the shared instance
            return fs

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def journal_dir(self, *parts: str) -> Path:
        """Where the journals of one table partition live: beside its shards on a local root;
        for any other root (s3://, gs://, memory://) in the local spool, one folder per root
        (docs/design.md §4.2), so journaling costs the same local append everywhere."""
        if self.local:
            return Path(self.path(*parts))
        return spool_root(self).joinpath(*parts)

    def local_dir(self, *parts: str) -> str:
        """A folder for files written by local tools (server logs, reports, exports): inside
        the results root when that is a local disk, else ./toa-<first part>/... here."""
        if self.local:
            return self.path(*parts)
        return str(Path.cwd() / f"toa-{parts[0]}" / Path(*parts[1:]))

    def init_tables(self) -> None:
        """Create every table folder with its empty schema shard; fails early on a root
        without write permission, before any model call is made."""
        from toa.rows import SCHEMAS, frame

        for table in SCHEMAS:
            target = self.path(table, SCHEMA_SHARD)
            if not self.fs.exists(target) or self._schema_of(target) != frame(table, []).schema:
                try:  # missing, or written by a toa whose table had fewer columns: views need them all
                    self.write_frame(frame(table, []), target)
                except OSError as exc:  # say which setting to fix, not only which file failed
                    raise ResultsRootNotWritable(f"cannot write to results_root {self.url!r}: "
                                          f"{type(exc).__name__}: {exc}") from exc

    def _schema_of(self, target: str) -> pl.Schema | None:
        import polars as pl

        try:
            with self.fs.open(target, "rb") as f:
                return pl.read_parquet_schema(f)
        except Exception:  # noqa: BLE001 -- unreadable: rewrite it
            return None

    # -- writing ---------------------------------------------------------------------------
    def write_frame(self, df: pl.DataFrame, target: str) -> str:
        buf = io.BytesIO()
        # zstd level 1: a quarter less CPU than the default 3 for 5 % larger shards of text
        # (benchmarks/store_scale.py); reading them costs the same
        df.write_parquet(buf, compression="zstd", compression_level=1)
        self._put(buf.getvalue(), target)
        return target

    def write_rows(self, table: str, rows: list[Any], *parts: str) -> str:
        """Typed rows as one shard, encoded by Arrow straight from the rows (toa.rows.arrow):
        the same file write_frame(frame(...)) makes, at about two thirds of its CPU."""
        import pyarrow.parquet as pq

        from toa.rows import arrow

        data, dictionary = arrow(table, rows)
        target = self.path(table, *parts)
        # min/max statistics only where a dictionary is (a filter on free text or a unique id
        # never skips a row group by them; they were a sixth of the write)
        self._put_with(lambda sink: pq.write_table(data, sink, compression="zstd", compression_level=1,
                                                   use_dictionary=dictionary, write_statistics=dictionary), target)
        return target

    def write_json(self, obj: Any, *parts: str) -> None:
        self.write_bytes(json.dumps(obj, indent=1, default=str).encode(), *parts)

    def write_bytes(self, data: bytes, *parts: str) -> None:
        self._put(data, self.path(*parts))

    def _put_with(self, write: Callable[[Any], None], target: str) -> None:
        """`write(sink)` writes the file: on a local root straight into an Arrow file (Arrow
        encodes into it without holding the GIL, and no copy of the bytes is made in Python);
        elsewhere into memory, then one PUT."""
        if not self.local:
            buf = io.BytesIO()
            write(buf)
            return self._put(buf.getvalue(), target)
        import pyarrow as pa

        with self._local_swap(target) as tmp, pa.OSFile(tmp, "wb") as sink:  # a file: no URI parsing of the name
            write(sink)

    def _put(self, data: bytes, target: str) -> None:
        if not self.local:
            self.fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
            self.fs.pipe_file(target, data)  # object stores: one PUT, visible whole or not at all
            return
        with self._local_swap(target) as tmp, open(tmp, "wb") as fh:
            fh.write(data)

    @contextlib.contextmanager
    def _local_swap(self, target: str) -> Iterator[str]:
        """A temporary path beside a local `target`, renamed onto it once written (a rename on
        the same disk: readers see the old file or the new one, never a part); removed if the
        write fails. Readers skip the temporary names (Store.files)."""
        os.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
        tmp = f"{target}.{uuid.uuid4().hex}.tmp"
        try:
            yield tmp
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        os.replace(tmp, target)

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
        import polars as pl

        from toa.rows import SCHEMAS, frame

        frames = []
        for f in self.files(table, *parts):
            with self.fs.open(f, "rb") as fh:
                frames.append(pl.read_parquet(fh))
        if not frames:
            return frame(table, [])
        merged = pl.concat(frames, how="diagonal_relaxed")
        schema = SCHEMAS[table]  # shards written before a column was added read it as null
        missing = [pl.lit(None, dtype).alias(c) for c, dtype in schema.items() if c not in merged.columns]
        return merged.with_columns(missing).select(list(schema))


# 1024 rows a part: at 256, 10 M samples made ~39k call parts, and the file count, not the row
# count, set query time (benchmarks/store_scale.py); the journal keeps rows safe meanwhile.
PART_ROWS = 1024
WRITER_THREADS = 2  # part files encoded at once, beside the event loop and the task thread
_pool: tuple[int, ThreadPoolExecutor] | None = None


def _writers() -> ThreadPoolExecutor:
    """The process's part-file writer threads (made again in a forked child, which has none)."""
    global _pool
    if _pool is None or _pool[0] != os.getpid():
        _pool = (os.getpid(), ThreadPoolExecutor(WRITER_THREADS, thread_name_prefix="toa-part-writer"))
    return _pool[1]


class ShardWriter:
    """Buffers rows of one table and writes them as part files (every `flush_rows` rows or
    `flush_s` seconds), encoded by the process's writer threads; `flush()` waits for them.
    Thread-safe: the request layer appends from the event loop, the task thread flushes.

    Every row is also appended to a journal (`journal-<id>.jsonl`: beside the shards on a local
    root, in the local spool for an object store, Store.journal_dir) the moment it arrives, so
    a kill loses no finished call, only those in flight: the next writer of the partition turns
    the journals of dead writers into a shard (rows already in a shard skipped) before the
    partition is read. A live writer holds an flock on its journal, so it is never taken from
    under it. A spool is per machine: a dead writer's spooled rows reach the store when a
    writer of the same partition next starts on that machine (docs/design.md §4.2)."""

    def __init__(self, store: Store, table: str, *parts: str, flush_rows: int = PART_ROWS, flush_s: float = 2.0,
                 journal: bool = True):
        self.store, self.table, self.parts = store, table, parts
        self.flush_rows, self.flush_s = flush_rows, flush_s
        self._rows: list[Any] = []
        self._lock = threading.Lock()
        self._last = time.monotonic()
        self._journal = None  # open file of the current journal, made on first row
        self._pending: list[Future] = []  # part files being written in the background
        self.written = 0
        # journal=False: no crash journal (benchmarks/store_scale.py times the store's writes alone)
        self.journaled = fcntl is not None and journal
        self._journal_dir = store.journal_dir(table, *parts) if self.journaled else None
        if self.journaled:
            self.recover()

    def append(self, row: Any) -> None:
        with self._lock:
            self._rows.append(row)
            if self.journaled:
                self._journal_line(row)
            due = len(self._rows) >= self.flush_rows or time.monotonic() - self._last >= self.flush_s
        if due:
            self._start_part()

    def flush(self) -> None:
        """Write the buffered rows, and wait for every part file this writer started; raises the
        first write that failed (its rows stay in their journal for the next writer)."""
        self._start_part()
        with self._lock:
            pending, self._pending = self._pending, []
        for part in pending:
            part.result()

    def _start_part(self) -> None:
        """Hand the buffered rows to the writer threads. Writing a part (~15 ms of CPU for 1024
        calls of 1.5 kB) runs there beside the event loop and the next rows' work: the Parquet
        encoding (~9 us a row) releases the GIL, the conversion of the rows to Arrow (~5 us a
        row) holds it (benchmarks/store_scale.py)."""
        with self._lock:
            rows, self._rows = self._rows, []
            journal, self._journal = self._journal, None  # later rows go to a fresh journal
            self._last = time.monotonic()
            failed = [p for p in self._pending if p.done() and p.exception() is not None]
            self._pending = [p for p in self._pending if not p.done()]
            if rows or journal is not None:
                self._pending.append(_writers().submit(self._write_part, rows, journal))
        if failed:
            failed[0].result()  # raise it now, not only at the end of the unit

    def _write_part(self, rows: list[Any], journal) -> None:
        try:
            if rows:
                self.store.write_rows(self.table, rows, *self.parts, f"part-{uuid.uuid4().hex}.parquet")
        except BaseException:
            if journal is not None:
                journal.close()  # unlocked, not removed: the next writer of the partition recovers it
            raise
        with self._lock:
            self.written += len(rows)
        if journal is not None:  # its rows are in a shard now (or it was empty)
            Path(journal.name).unlink(missing_ok=True)
            journal.close()

    def _journal_line(self, row: Any) -> None:
        if self._journal is None:
            path = self._journal_dir / f"journal-{uuid.uuid4().hex}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            self._journal = open(path, "ab", buffering=0)
            fcntl.flock(self._journal, fcntl.LOCK_EX)  # released by the kernel if this process dies
        # One unbuffered write per row: in the kernel at once, so it survives kill -9 (not a
        # power cut). orjson serialises the row dataclass directly (dataclasses.asdict + json
        # cost ~10x more per call: benchmarks/orchestrator.py).
        self._journal.write(orjson.dumps(row, default=str, option=orjson.OPT_APPEND_NEWLINE))

    def recover(self) -> int:
        """Write the rows of dead writers' journals in this partition (local or spooled) as one
        shard of the store (those not in a shard yet), then remove the journals; returns how
        many rows were recovered."""
        base = self._journal_dir
        if not base.is_dir():
            return 0
        # One recovery per partition at a time: a second writer (another method on the same
        # batch) waits here, then reads the recovered shard, instead of taking the journal
        # being recovered for a live one and making its calls again.
        with open(base / "_recover.lock", "a") as gate:
            fcntl.flock(gate, fcntl.LOCK_EX)
            return self._recover(base)

    def _recover(self, base: Path) -> int:
        from toa.rows import SCHEMAS, TABLES

        key = next(iter(SCHEMAS[self.table]))  # call_key / reward_key
        rows, done = [], []
        for path in sorted(base.glob("journal-*.jsonl")):
            fh = open(path, encoding="utf-8")
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # a live writer's journal
                fh.close()
                continue
            for line in fh.read().splitlines():
                try:
                    data = json.loads(line)
                except json.JSONDecodeError:
                    continue  # the line being written when the process died
                # typed again (CallRecord / RewardRecord): a journal from before a column with
                # a default was added still loads; an unknown column raises
                rows.append(TABLES[self.table](**data))
            done.append((path, fh))
        if rows:
            # a row is identified by its key and creation time (an ok row may follow an error one)
            ident = [key, "created_at"] if "created_at" in SCHEMAS[self.table] else [key]
            stored = set(self.store.read(self.table, *self.parts).select(ident).iter_rows())
            fresh = {tuple(getattr(r, c) for c in ident): r for r in rows}
            fresh = {k: r for k, r in fresh.items() if k not in stored}
            if fresh:
                self.store.write_rows(self.table, list(fresh.values()), *self.parts, f"part-{uuid.uuid4().hex}.parquet")
            rows = list(fresh.values())
        for path, fh in done:
            path.unlink(missing_ok=True)
            fh.close()
        return len(rows)
