"""A Dask worker dies mid-batch (docs/design.md §4.2): a real `toa run` with its (method, batch)
tasks on a temporary LocalCluster of two worker processes, attached to tests/openai_double.py in
slow mode; the worker process that holds a live call journal (it is mid-batch, with finished
calls recorded) is killed with SIGKILL. The run must still finish (exit 0), the lost batch run
again elsewhere, replaying the dead worker's journaled calls instead of asking for them again,
with no duplicate row in any table and every shard readable.

Which worker is mid-batch is read from the kernel: /proc/locks names the process holding the
flock on a call journal (toa.storage.ShardWriter), so no sleep decides when to kill.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
from openai_double import OpenAIDouble

from toa.db import query
from toa.storage import Store

KEY = "sk-double-key"
PROMPTS, N, AGENTS, BATCH = 8, 2, ("a", "b"), 4
METHODS = ("random", "parallel_ensemble")
RECORDS = PROMPTS * N * len(AGENTS) * len(METHODS)  # every method's budget: n * agents per prompt
REQUESTS = PROMPTS * (1 + len(AGENTS))  # random: one request (n=4); parallel_ensemble: one per agent
MAX_IN_FLIGHT = len(AGENTS)  # per worker process: max_concurrency = 1 per agent


def run_file(tmp_path: Path, double: OpenAIDouble) -> Path:
    lines = [f"results_root = {json.dumps(str(tmp_path / 'results'))}", f"methods = {json.dumps(list(METHODS))}",
             f"n = {N}", f"batch_size = {BATCH}", "[prompts]", f"limit = {PROMPTS}",
             "[reward]", 'kind = "custom"', 'function = "openai_double:length"',
             "[task_runner]", 'kind = "dask"', "n_workers = 2", "threads_per_worker = 1",
             'cluster_kwargs = { dashboard_address = ":0" }']
    for alias in AGENTS:
        lines += ["[[agents]]", f'alias = "{alias}"', "max_concurrency = 1", "[agents.endpoint]",
                  f'base_url = "{double.url("slow")}"', f'model = "m-{alias}"', f'api_key = "{KEY}"',
                  "[agents.sampling]", "max_tokens = 8"]
    path = tmp_path / "run.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def journal_holders(root: Path) -> dict[int, Path]:
    """{pid: call journal} for every call journal that has a finished call in it and whose flock
    a live process holds (the kernel's /proc/locks: `FLOCK ADVISORY WRITE <pid> <dev>:<inode> ...`)."""
    journals = {}
    for path in (root / "calls").rglob("journal-*.jsonl"):
        try:
            if path.stat().st_size > 0:
                journals[path.stat().st_ino] = path
        except FileNotFoundError:  # flushed into a shard meanwhile
            continue
    holders = {}
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[3] == "WRITE":
            inode = int(fields[5].rsplit(":", 1)[1])
            if inode in journals:
                holders[int(fields[4])] = journals[inode]
    return holders


def wait_for(find, timeout_s: float, what: str, proc: subprocess.Popen):
    """Poll `find()` until it returns something truthy (no fixed sleep decides anything)."""
    deadline = time.monotonic() + timeout_s
    while not (found := find()):
        if proc.poll() is not None:
            raise AssertionError(f"toa run ended before {what}:\n{proc.stdout.read().decode()[-3000:]}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return found


def data_shards(root: Path, table: str) -> list[Path]:
    return [f for f in (root / table).rglob("*.parquet") if f.name != "_schema.parquet"]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_a_worker_killed_mid_batch_costs_only_its_calls_in_flight(prefect_api, tmp_path):
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(),
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    root = tmp_path / "results"
    with OpenAIDouble(KEY, slow_s=1.0) as double:
        proc = subprocess.Popen([sys.executable, "-m", "toa.cli", "run", "--config", str(run_file(tmp_path, double))],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            holders = wait_for(lambda: {p: j for p, j in journal_holders(root).items() if p != proc.pid},
                               300, "a worker with journaled calls", proc)
            victim, journal = next(iter(holders.items()))
            os.kill(victim, signal.SIGKILL)
            killed_at = len(double.requests)
            lost = [json.loads(line) for line in journal.read_text().splitlines() if line.endswith("}")]
            out = proc.communicate(timeout=400)[0].decode()
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        requests = [body for _, _, body in double.requests]
    assert proc.returncode == 0, out[-4000:]
    assert not alive(victim) and victim != proc.pid
    assert lost and killed_at < REQUESTS, "the kill did not land mid-run"
    print(f"\nkilled worker {victim} with {len(lost)} journaled calls, {killed_at} of {REQUESTS} requests made")

    # Raw shards: every one readable, no row twice, every call and sample there once.
    frames = {t: [pl.read_parquet(f) for f in data_shards(root, t)] for t in ("calls", "rewards", "samples")}
    calls, rewards, samples = (pl.concat(frames[t]) for t in ("calls", "rewards", "samples"))

    # The double: every distinct request once, except those the dead worker had in flight (the
    # requests counted are those recorded as calls, by their seed: an identity probe is not a call).
    asked = [body for body in requests if body.get("seed") in set(calls["seed"])]
    bodies = [json.dumps(body, sort_keys=True) for body in asked]
    assert len(set(bodies)) == REQUESTS
    assert len(bodies) - REQUESTS <= MAX_IN_FLIGHT
    seeds = [body["seed"] for body in asked]
    for call in lost:  # the dead worker's finished calls were replayed from its journal, never asked again
        assert seeds.count(call["seed"]) == 1, call["call_key"]
    assert calls.height == calls["call_key"].n_unique() == RECORDS and calls["status"].eq("ok").all()
    assert {c["call_key"] for c in lost} <= set(calls["call_key"])
    assert rewards.height == rewards["reward_key"].n_unique() and rewards["status"].eq("ok").all()
    assert samples.height == samples.select("method", "sample_id").n_unique() == RECORDS
    assert list((root / "calls").rglob("journal-*.jsonl")) == []  # the dead worker's journal was taken in

    # The views agree, and the run counts the dead worker's calls as replayed.
    store = Store(str(root))
    assert query(store, "select count(*) as n from calls where status = 'ok'")["n"][0] == RECORDS
    assert query(store, "select count(*) as n from samples where reward_status = 'ok'")["n"][0] == RECORDS
    rows = [line.split() for line in out.splitlines() if line.startswith(METHODS)]
    assert len(rows) == len(METHODS) and sum(int(r[7]) for r in rows) >= len(lost), out[-3000:]
    workers = {json.loads(m.read_text())["worker"] for m in (root / "done").rglob("*.json")}
    assert len(list((root / "done").rglob("*.json"))) == len(METHODS) * PROMPTS // BATCH
    assert not any(w.endswith(f":{victim}") for w in workers)  # the lost batch finished elsewhere


# -- unit test: no Prefect API; an in-process cluster --------------------------------------------
def _gave_up() -> None:
    from types import SimpleNamespace

    from distributed import KilledWorker

    raise KilledWorker("sample-batch-b1", SimpleNamespace(address="tcp://127.0.0.1:40001"), 3)


def test_a_unit_the_scheduler_gave_up_on_is_named_with_why():
    """KilledWorker (the task took `allowed-failures` workers down) leaves the task run Running
    in the API; the flow's failure list then says what happened instead of None."""
    from uuid import uuid4

    from distributed import Client, LocalCluster
    from prefect_dask.task_runners import PrefectDaskFuture

    from toa.runners import lost_on_cluster

    with LocalCluster(processes=False, n_workers=1, threads_per_worker=1, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        gave_up = PrefectDaskFuture(wrapped_future=client.submit(_gave_up, pure=False), task_run_id=uuid4())
        fine = PrefectDaskFuture(wrapped_future=client.submit(lambda: 1, pure=False), task_run_id=uuid4())
        gave_up.wrapped_future.exception(timeout=30), fine.wrapped_future.result(timeout=30)
        why = lost_on_cluster(gave_up)
        assert why is not None and why.startswith("lost on the Dask cluster: KilledWorker: ")
        assert "sample-batch-b1" in why
        assert lost_on_cluster(fine) is None
    assert lost_on_cluster(object()) is None  # a thread-pool future: nothing of Dask's to ask
