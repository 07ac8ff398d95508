"""Object-store results roots (docs/design.md §4.2): the local journal spool of ShardWriter, and
`toa run`, `toa sql`, `toa report`, `toa export` on an s3:// root.

- spool recovery on a memory:// root (fsspec's in-process object store): a writer killed with -9
  in a real subprocess leaves its journal in the local spool; the next writer of the partition
  turns it into one shard of the store, once (fast);
- a real S3-compatible server (moto's server mode, a subprocess on 127.0.0.1, started here) with
  real `toa run` subprocesses against tests/openai_double.py (integration): a run finishes and is
  queried, reported and exported; kill -9 mid-sampling, then a rerun, loses no finished call.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import polars as pl
import pytest
from helpers import call_row, wait_until
from openai_double import OpenAIDouble

from toa.db import query
from toa.storage import ShardWriter, Store, spool_root

KEY = "sk-double-key"
S3_KEY, S3_SECRET = "toa-test-access-key", "toa-test-secret-7f3c9a"  # moto takes any credentials
TESTS = Path(__file__).parent


def journals(folder: Path) -> list[Path]:
    return sorted(folder.rglob("journal-*.jsonl")) if folder.exists() else []


def spooled_rows(folder: Path) -> int:
    """Rows in the journals under `folder` right now (a journal may vanish while being read)."""
    rows = 0
    for journal in journals(folder):
        try:
            rows += len(journal.read_bytes().splitlines())
        except FileNotFoundError:
            pass
    return rows


# -- the spool, on fsspec's in-process object store ----------------------------------------------
def test_a_killed_writers_spooled_journal_becomes_one_shard_of_the_object_store(tmp_path, monkeypatch):
    monkeypatch.setenv("TOA_HOME", str(tmp_path / "home"))
    url = f"memory://toa-spool-{uuid.uuid4().hex}/results"
    store = Store(url)
    assert not store.local
    spool = spool_root(store) / "calls" / "batch=b"
    assert spool.is_relative_to(tmp_path / "home" / "spool") and store.journal_dir("calls", "batch=b") == spool

    # A writer in another process journals three rows (never flushed) and is killed with -9. Its
    # memory:// store dies with it; only the local spool can hold the rows.
    code = ("import os, signal, sys; sys.path[:0] = [sys.argv[1]]; from helpers import call_row; "
            "from toa.storage import Store, ShardWriter; w = ShardWriter(Store(sys.argv[2]), 'calls', 'batch=b', "
            "flush_s=1e9); [w.append(call_row(f'k{i}', float(i))) for i in range(3)]; os.kill(os.getpid(), signal.SIGKILL)")
    proc = subprocess.run([sys.executable, "-c", code, str(TESTS), url], check=False)
    assert proc.returncode == -signal.SIGKILL
    assert store.read("calls").height == 0 and len(journals(spool)) == 1
    assert len(journals(spool)[0].read_text().splitlines()) == 3

    live = ShardWriter(store, "calls", "batch=b", flush_s=1e9)  # the next writer recovers them
    assert sorted(store.read("calls")["call_key"]) == ["k0", "k1", "k2"]
    assert len(store.files("calls", "batch=b")) == 1 and journals(spool) == []

    live.append(call_row("k3", 3.0))  # a live writer's spooled journal is not taken by a second writer
    assert len(journals(spool)) == 1
    ShardWriter(store, "calls", "batch=b")
    assert store.read("calls").height == 3 and len(journals(spool)) == 1
    live.flush()  # its shard is on the store, its journal gone
    assert sorted(store.read("calls")["call_key"]) == ["k0", "k1", "k2", "k3"] and journals(spool) == []

    # Killed between the PUT of a shard and removing its journal (and mid-line): nothing twice.
    (spool / "journal-x.jsonl").write_text(json.dumps(call_row("k3", 3.0)) + "\n{\"trunc")
    assert ShardWriter(store, "calls", "batch=b").written == 0
    assert store.read("calls").height == 4 and journals(spool) == []
    # and DuckDB reads the object store through its own snapshot of the filesystem (toa.db)
    assert store.snapshot_fs() is not store.fs
    assert query(store, "select count(*) as n from calls")["n"][0] == 4


def test_each_object_store_root_has_its_own_spool_and_local_roots_keep_theirs_beside_the_shards(tmp_path, monkeypatch):
    monkeypatch.setenv("TOA_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    a, b = Store("memory://bucket/a"), Store("memory://bucket/b")
    assert spool_root(a) != spool_root(b) and spool_root(a) == spool_root(Store("memory://bucket/a/"))
    # the same bucket on two servers is two roots; the credentials do not move the spool
    one = Store("s3://bucket/toa", {"endpoint_url": "http://127.0.0.1:1"})
    two = Store("s3://bucket/toa", {"endpoint_url": "http://127.0.0.1:2"})
    rotated = Store("s3://bucket/toa", {"endpoint_url": "http://127.0.0.1:1", "key": "k2", "secret": "s2"})
    assert spool_root(one) != spool_root(two) and spool_root(one) == spool_root(rotated)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")  # botocore's variable names the same server
    assert spool_root(Store("s3://bucket/toa")) == spool_root(one)

    local = Store(str(tmp_path / "results"))
    writer = ShardWriter(local, "calls", "batch=b", flush_s=1e9)
    writer.append(call_row("k0"))
    assert len(journals(tmp_path / "results" / "calls" / "batch=b")) == 1
    assert not (tmp_path / "home" / "spool").exists()  # local roots never use the spool
    writer.flush()


def test_a_root_whose_filesystem_package_is_missing_is_one_clear_message(monkeypatch):
    import fsspec

    from toa.errors import UserError

    def missing(url, **options):  # what fsspec raises for s3:// without s3fs
        raise ImportError("Install s3fs to access S3")

    monkeypatch.setattr(fsspec.core, "url_to_fs", missing)
    with pytest.raises(UserError, match=r"results_root 's3://bucket/toa': Install s3fs"):
        Store("s3://bucket/toa")


# -- a real S3-compatible server -----------------------------------------------------------------
class S3Server:
    """moto's S3 server (a real HTTP server in its own process) on 127.0.0.1."""

    def __init__(self, log: Path):
        from toa.servers.vllm import free_port

        self.endpoint = f"http://127.0.0.1:{free_port()}"
        self.log = open(log, "wb")  # noqa: SIM115 -- open for the server's life, closed by stop()
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                                      "-p", self.endpoint.rsplit(":", 1)[1]],
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_until(self._answers, 60, "the S3 server")

    def _answers(self) -> bool:
        assert self.proc.poll() is None, f"moto server exited: {Path(self.log.name).read_text()[-2000:]}"
        try:
            urllib.request.urlopen(self.endpoint, timeout=2).read()
            return True
        except OSError:
            return False

    def bucket(self) -> str:
        """A fresh bucket; its name."""
        name = f"toa-{uuid.uuid4().hex[:12]}"
        self.fs().mkdir(name)
        return name

    def fs(self):
        import s3fs

        return s3fs.S3FileSystem(endpoint_url=self.endpoint, key=S3_KEY, secret=S3_SECRET, use_listings_cache=False)

    def store(self, url: str) -> Store:
        return Store(url, {"endpoint_url": self.endpoint, "key": S3_KEY, "secret": S3_SECRET})

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    server = S3Server(tmp_path_factory.mktemp("moto") / "moto.log")
    try:
        yield server
    finally:
        server.stop()


class CountingDouble(OpenAIDouble):
    """tests/openai_double.py's real HTTP double, also noting every answer it finished sending:
    (time, request), so a kill can be judged against the calls finished before it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.answered: list[tuple[float, str]] = []
        double, base = self, self.server.RequestHandlerClass

        class Counting(base):
            def _send(self, status: int, payload: dict) -> None:
                super()._send(status, payload)
                if status == 200 and "choices" in payload:
                    with double.lock:
                        double.answered.append((time.monotonic(), payload["choices"][0]["message"]["content"]))

        self.server.RequestHandlerClass = Counting


def request_id(body: dict) -> str:
    """What the double's answer to `body` starts with (answer 0 (seed ...) to: ...): one per call."""
    return f"answer 0 (seed {body.get('seed')}) to: {body['messages'][-1]['content'][:40]}"


def s3_run_file(tmp_path: Path, server: S3Server, url: str, double: OpenAIDouble, mode: str, limit: int,
                concurrency: int) -> Path:
    """Two agents on the double, the endpoint of the S3 server in storage_options (credentials come
    from the environment, as on a machine with an AWS profile)."""
    lines = [f"results_root = {json.dumps(url)}", 'methods = ["random", "parallel_ensemble"]', "n = 2",
             "batch_size = 4", "task_retries = 0", "[storage_options]", f"endpoint_url = {json.dumps(server.endpoint)}",
             "[prompts]", f"limit = {limit}", "[reward]", 'kind = "custom"', 'function = "openai_double:length"']
    for alias in ("a", "b"):
        lines += ["[[agents]]", f'alias = "{alias}"', f"max_concurrency = {concurrency}", "[agents.endpoint]",
                  f'base_url = "{double.url(mode)}"', 'model = "m"', f'api_key = "{KEY}"',
                  "[agents.sampling]", "max_tokens = 8"]
    path = tmp_path / "run.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def toa_env(tmp_path: Path, endpoint: str | None = None) -> dict[str, str]:
    """The environment of the toa subprocesses: S3 credentials (and, for the commands that take
    only --root, the endpoint) as AWS variables, the spool and DuckDB file under this test."""
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PYTHONPATH": str(TESTS),
           "TOA_HOME": str(tmp_path / "toa-home"), "AWS_ACCESS_KEY_ID": S3_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET}
    env.pop("AWS_ENDPOINT_URL", None)
    if endpoint:
        env["AWS_ENDPOINT_URL"] = endpoint
    return env


def toa(tmp_path: Path, env: dict[str, str], *args: str, timeout: float = 300) -> str:
    done = subprocess.run([sys.executable, "-m", "toa.cli", *args], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=timeout, check=False)
    assert done.returncode == 0, f"toa {args[0]} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


def shards_readable(server: S3Server, bucket: str) -> int:
    """Reads every Parquet file under the bucket whole; returns how many."""
    fs = server.fs()
    files = [f for f in fs.find(bucket) if f.endswith(".parquet")]
    for f in files:
        with fs.open(f, "rb") as fh:
            pl.read_parquet(fh)
    return len(files)


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_a_run_on_an_s3_root_finishes_and_sql_report_and_export_read_it(prefect_api, s3_server, tmp_path):
    bucket = s3_server.bucket()
    url = f"s3://{bucket}/toa"
    with OpenAIDouble(KEY) as double:
        run_file = s3_run_file(tmp_path, s3_server, url, double, "ok", limit=4, concurrency=4)
        out = toa(tmp_path, toa_env(tmp_path), "run", "--config", str(run_file))
    store = s3_server.store(url)
    run_id = query(store, "select run_id from runs")["run_id"][0]
    # 4 prompts x (random: 4 from a; parallel_ensemble: 2 from each) = 32 generations, all in the bucket
    counts = query(store, "select method, count(*) as n from samples where status = 'ok' group by 1 order by 1")
    assert counts.rows() == [("parallel_ensemble", 16), ("random", 16)]
    assert shards_readable(s3_server, bucket) > len(counts)
    assert not (tmp_path / "results").exists()  # nothing went to a local results folder
    spool = tmp_path / "toa-home" / "spool"
    assert spool.is_dir() and journals(spool) == []  # journaled there, and every journal became a shard

    env = toa_env(tmp_path, s3_server.endpoint)
    answer = toa(tmp_path, env, "sql", "--root", url, "select method, generations from method_summary order by 1")
    assert "parallel_ensemble" in answer and "random" in answer and "16" in answer
    report = toa(tmp_path, env, "report", run_id, "--root", url, "--out", str(tmp_path / "report"))
    assert "markdown" in report and "random" in (tmp_path / "report" / "report.md").read_text()
    exported = toa(tmp_path, env, "export", run_id, "--root", url, "--out", str(tmp_path / "exports"),
                   "--format", "jsonl", "--format", "parquet")
    assert "random/sft.jsonl" in exported
    for method in ("random", "parallel_ensemble"):
        assert len((tmp_path / "exports" / method / "sft.jsonl").read_text().splitlines()) == 4  # one per prompt
        pairs = query(store, "select count(*) as n from dpo where method = ?", [method])["n"][0]
        assert pl.read_parquet(tmp_path / "exports" / method / "dpo.parquet").height == pairs

    # the secret never left the environment: not printed, not stored in the bucket
    fs = s3_server.fs()
    assert S3_SECRET not in out and S3_SECRET not in answer + report + exported
    assert not [f for f in fs.find(bucket) if S3_SECRET.encode() in fs.cat_file(f)]


# kill -9 mid-sampling: 12 prompts x 2 methods x 4 generations, as 12 + 24 requests (random asks
# agent a once per prompt for n = 4, parallel_ensemble each agent once for n = 2); one request in
# flight per agent, each answered after 1 s: about 18 s of sampling to kill into
PROMPTS, REQUESTS, GENERATIONS = 12, 12 + 12 * 2, 12 * 2 * 4
MARGIN_S = 1.0  # an answer sent this long before the kill has been received and handled by toa


@pytest.mark.integration
@pytest.mark.timeout(400)
def test_kill9_mid_sampling_on_an_s3_root_then_rerun_loses_no_finished_call(prefect_api, s3_server, tmp_path):
    bucket = s3_server.bucket()
    url = f"s3://{bucket}/toa"
    env = toa_env(tmp_path)
    spool = tmp_path / "toa-home" / "spool"
    cmd = [sys.executable, "-m", "toa.cli", "run", "--config"]
    kills = []
    with CountingDouble(KEY, slow_s=1.0) as double:
        run_file = s3_run_file(tmp_path, s3_server, url, double, "slow", limit=PROMPTS, concurrency=1)
        for k, after in enumerate((4, 8)):  # answers this attempt must have seen before its kill
            seen, asked = len(double.answered), len(double.requests)
            proc = subprocess.Popen([*cmd, str(run_file)], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            # kill where finished calls are held only by the spool (none since the last ~2 s flush)
            wait_until(lambda seen=seen, after=after: len(double.answered) - seen >= after and spooled_rows(spool) > 0, 240,
                       f"answers before kill {k + 1}", proc)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            killed_at = time.monotonic()
            # This attempt's requests answered well before the kill are finished; the rest were in
            # flight. (Answers the double sends after a kill, to requests of the killed attempt,
            # reach no one: they count for neither attempt.)
            with double.lock:
                mine = {request_id(body) for _, _, body in double.requests[asked:]}
                settled = mine & {r for t, r in double.answered[seen:] if t < killed_at - MARGIN_S}
                in_flight = len(mine - settled)
            kills.append({"kill": k + 1, "killed_at": killed_at, "settled": settled, "spooled_rows": spooled_rows(spool),
                          "in_flight": in_flight})  # probe requests included: an over-estimate
        toa(tmp_path, env, "run", "--config", str(run_file))  # the rerun finishes
        with double.lock:
            requests = [(t, request_id(body)) for _, t, body in double.requests]

    # Sampling requests only: a run also sends requests of its own (the endpoint's identity probe
    # at attach, seed 0, made again by every start), which no call record stands for.
    store = s3_server.store(url)
    recorded = {f"answer 0 (seed {seed}) to: {json.loads(request)['messages'][-1]['content'][:40]}"
                for seed, request in query(store, "select distinct seed, request_json from calls").iter_rows()}
    requests = [(t, r) for t, r in requests if r in recorded]
    # No lost finished call: nothing answered well before a kill was asked for again after it.
    for kill in kills:
        again = {r for t, r in requests if t > kill["killed_at"]} & kill["settled"]
        assert not again, f"kill {kill['kill']}: {len(again)} finished calls made again: {sorted(again)[:3]}"
    repeated = len(requests) - len({r for _, r in requests})
    in_flight = sum(kill["in_flight"] for kill in kills)
    print(f"\nkill -9 x{len(kills)} on s3: " + "; ".join(
        f"kill {k['kill']}: {len(k['settled'])} requests answered before it, {k['spooled_rows']} rows in the spool"
        for k in kills) + f"\nrequests {len(requests)} for {REQUESTS} distinct: {repeated} repeated, "
        f"at most {in_flight} in flight at the kills")
    assert len({r for _, r in requests}) == REQUESTS and 0 <= repeated <= in_flight
    assert any(k["spooled_rows"] > 0 for k in kills)  # the kills found rows only the spool held
    assert journals(spool) == []  # the rerun turned every spooled journal into a shard

    samples = query(store, "select count(*) as n, count(distinct (method, sample_id)) as k, count(*) filter "
                           "(where status = 'ok' and reward_status = 'ok') as good from samples")
    assert samples.rows() == [(GENERATIONS, GENERATIONS, GENERATIONS)]  # every generation, none twice
    attempts = query(store, "select count(*) as n, count(distinct call_key) as k, "
                            "count(*) filter (where status <> 'ok') as bad from call_attempts")
    assert attempts.rows() == [(GENERATIONS, GENERATIONS, 0)]  # no call recorded twice
    rewards = query(store, "select count(*) as n, count(distinct reward_key) as k from "
                           "read_parquet(? || '/rewards/**/*.parquet')", [url])
    assert rewards["n"][0] == rewards["k"][0] == GENERATIONS
    assert query(store, "select count(*) as n from sft")["n"][0] == PROMPTS * 2
    assert shards_readable(s3_server, bucket) > 0
