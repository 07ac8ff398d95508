"""Two runs at once (docs/design.md §4.2, toa.runlock): two real `toa run` processes started
together on one config and one results root (a cron run overlapping a manual one), as a user
starts them (no Prefect API configured: each would start its own), attached to
tests/openai_double.py in slow mode so that the runs overlap. One holds the run, the other says
who holds it and waits; both exit 0, every model call is made once (counted at the double), no
table has a row twice and every shard reads.

The lock itself (re-entrant, stoppable, the holder named) is checked in-process below, against
a holder in another real process.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import polars as pl
import pytest
from openai_double import OpenAIDouble

from toa import runlock, stopping
from toa.db import query
from toa.storage import Store

KEY = "sk-double-key"
PROMPTS, N, AGENTS = 8, 2, ("a", "b")
METHODS = ("random", "parallel_ensemble")
RECORDS = PROMPTS * N * len(AGENTS) * len(METHODS)  # n * agents generations per prompt and method
WAITING = re.compile(r"run (\w+) is being run by (\S+):(\d+) \(started [^)]+\); waiting for it")


def run_file(tmp_path: Path, double: OpenAIDouble) -> Path:
    lines = [f"results_root = {json.dumps(str(tmp_path / 'results'))}", f"methods = {json.dumps(list(METHODS))}",
             f"n = {N}", "batch_size = 4", "[prompts]", f"limit = {PROMPTS}",
             "[reward]", 'kind = "custom"', 'function = "openai_double:length"']
    for alias in AGENTS:
        lines += ["[[agents]]", f'alias = "{alias}"', "max_concurrency = 1", "[agents.endpoint]",
                  f'base_url = "{double.url("slow")}"', f'model = "m-{alias}"', f'api_key = "{KEY}"',
                  "[agents.sampling]", "max_tokens = 8"]
    path = tmp_path / "run.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def toa_run(run_file: Path) -> subprocess.Popen:
    """`toa run` as from a terminal: its own process group, no Prefect API configured."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])
    return subprocess.Popen([sys.executable, "-m", "toa.cli", "run", "--config", str(run_file)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def raw(root: Path, table: str) -> pl.DataFrame:
    """Every data shard of a table, read one by one (each must be readable on its own)."""
    shards = [f for f in (root / table).rglob("*.parquet") if f.name != "_schema.parquet"]
    assert shards, f"no {table} shards"
    return pl.concat([pl.read_parquet(f) for f in shards], how="diagonal_relaxed")


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_two_runs_at_once_one_waits_both_finish_nothing_twice(tmp_path):
    with OpenAIDouble(KEY, slow_s=0.3) as double:
        config = run_file(tmp_path, double)
        procs = [toa_run(config), toa_run(config)]
        try:
            outs = [p.communicate(timeout=500)[0].decode() for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, 9)
        requests = [body for _, _, body in double.requests]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    waits = [WAITING.findall(out) for out in outs]
    assert sorted(len(w) for w in waits) == [0, 1], [o[-2000:] for o in outs]  # one waited, said so once
    waiter = 0 if waits[0] else 1
    run_id, _, holder_pid = waits[waiter][0]
    assert int(holder_pid) == procs[1 - waiter].pid  # it named the process that held the run
    assert all(f"run {run_id}" in out.splitlines() for out in outs)  # the same run, printed by both

    # Every call asked once, by whichever process held the run (the requests counted are those
    # recorded as calls, by their seed: an endpoint's identity probe is not a call).
    root = tmp_path / "results"
    calls = raw(root, "calls")
    asked = [body for body in requests if body.get("seed") in set(calls["seed"])]
    assert sum(body.get("n", 1) for body in asked) == RECORDS
    assert len({json.dumps(body, sort_keys=True) for body in asked}) == len(asked)
    summary = [line.split() for line in outs[waiter].splitlines() if line.startswith(METHODS)]
    assert len(summary) == len(METHODS) and all(row[6] == "0" for row in summary), outs[waiter]  # no new call

    # Every shard readable; no row twice, raw and through the views.
    for shard in root.rglob("*.parquet"):
        pl.read_parquet(shard)
    rewards, samples = raw(root, "rewards"), raw(root, "samples")
    assert calls.height == calls["call_key"].n_unique() == RECORDS
    assert rewards.height == rewards["reward_key"].n_unique()
    assert samples.height == samples.select("method", "sample_id").n_unique() == RECORDS
    assert list(root.rglob("journal-*.jsonl")) == []
    store = Store(str(root))
    views = query(store, "select (select count(*) from calls) as calls, (select count(*) from call_attempts) as "
                         "attempts, (select count(*) from samples) as samples, (select count(*) from sft) as sft")
    assert views.rows() == [(RECORDS, RECORDS, RECORDS, PROMPTS * len(METHODS))]


# -- the lock on its own: a holder in another real process ---------------------------------------
HOLDER = ("import sys, time; from toa.runlock import hold_run; "
          "ctx = hold_run(sys.argv[1], None, 'r1'); ctx.__enter__(); print('held', flush=True); "
          "sys.stdin.read(); ctx.__exit__(None, None, None); print('released', flush=True); time.sleep(60)")


def holder(root: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(root)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_process_waits_names_the_holder_once_then_takes_the_lock(tmp_path):
    other = holder(tmp_path)
    said: list[str] = []
    got = threading.Event()

    def take():
        with runlock.hold_run(str(tmp_path), None, "r1", say=said.append) as waited:
            got.set()
            assert waited

    try:
        waiter = threading.Thread(target=take)
        waiter.start()
        deadline = time.monotonic() + 10
        while not said:
            assert time.monotonic() < deadline and not got.is_set()
            time.sleep(0.02)
        assert not got.is_set()
        other.stdin.close()  # the holder lets go
        assert other.stdout.readline().strip() == "released"
        waiter.join(timeout=10)
        assert got.is_set()
    finally:
        other.kill()
        other.wait()
    assert len(said) == 1 and said[0].startswith(f"run r1 is being run by {socket.gethostname()}:{other.pid} (started ")
    assert said[0].endswith("); waiting for it")
    assert (tmp_path / "runs" / "run=r1" / "run.lock").read_text() == ""  # released: names nobody


def test_the_lock_is_reentrant_in_a_process_and_a_dead_holder_leaves_none(tmp_path):
    with runlock.hold_run(str(tmp_path), None, "r1") as first:
        with runlock.hold_run(str(tmp_path), None, "r1", say=pytest.fail) as again:  # the CLI, then its flow
            assert not first and not again
        # still held after the inner release: another process cannot take it
        take = "import fcntl, sys; f = open(sys.argv[1]); fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)"
        probe = subprocess.run([sys.executable, "-c", take, str(tmp_path / "runs" / "run=r1" / "run.lock")],
                               capture_output=True, text=True, check=False)
        assert probe.returncode != 0 and "BlockingIOError" in probe.stderr
    other = holder(tmp_path)
    other.kill()  # SIGKILL: the kernel drops its flock
    other.wait()
    with runlock.hold_run(str(tmp_path), None, "r1", say=pytest.fail) as waited:
        assert not waited


def test_a_stop_ends_the_wait(tmp_path):
    other = holder(tmp_path)
    try:
        threading.Timer(0.3, stopping.request, args=("test stop",)).start()
        started = time.monotonic()
        with pytest.raises(stopping.Stopped, match="waiting for run r1"), \
                runlock.hold_run(str(tmp_path), None, "r1", say=lambda _: None):
            pass
        assert time.monotonic() - started < 2
    finally:
        stopping.reset()
        other.kill()
        other.wait()


def test_object_store_roots_lock_under_toa_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TOA_HOME", str(tmp_path / "home"))
    path = runlock.run_lock_path("memory://bucket/toa", None, "r1")
    assert path.parent == tmp_path / "home" / "locks" and path.suffix == ".lock"
    assert path == runlock.run_lock_path("memory://bucket/toa/", None, "r1")  # a trailing slash is the same root
    assert path != runlock.run_lock_path("memory://bucket/other", None, "r1")
    assert path != runlock.run_lock_path("memory://bucket/toa", None, "r2")
    assert runlock.run_lock_path(str(tmp_path), None, "r1") == tmp_path / "runs" / "run=r1" / "run.lock"
