"""Faults (docs/design.md §4.1-§4.3): what toa does when the process dies, a model server misbehaves, or
the reward backend raises. Each test checks the promise of docs/design.md §4.1-§4.3: nothing
recorded twice, nothing lost beyond the calls in flight, errors are rows with messages (never a
silent score), and a later run fills exactly what failed.

- kill -9 of a real `toa run` at seeded random points (integration, real vLLM servers);
- a misbehaving model server (tests/openai_double.py: 500s, hangs past the timeout, dropped
  connections) behind the real request layer and the real flow (integration, real Prefect API);
- a reward backend that raises, always and transiently (real request layer against the double,
  no Prefect: fast).
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from helpers import call_row
from openai_double import FLAKY, OpenAIDouble

from toa.db import query
from toa.storage import Store

KEY = "sk-double-key"


def double_agents(double: OpenAIDouble, modes: dict[str, str], **extra) -> list[dict]:
    return [{"alias": alias, "endpoint": {"base_url": double.url(mode), "model": "m", "api_key": KEY},
             "sampling": {"max_tokens": 8}, **extra} for alias, mode in modes.items()]


# -- a reward backend that raises -------------------------------------------------------------
def test_raising_reward_is_recorded_retried_and_never_a_silent_score(tmp_path):
    from toa.config import load_config
    from toa.engine import close_engines, run_batch
    from toa.plan import RunPlan
    from toa.prompts import iter_prompts
    from toa.servers import attach

    FLAKY.update(failures_left=0, broken=True, calls=0)
    with OpenAIDouble(KEY) as double:
        cfg = load_config(overrides={
            "agents": double_agents(double, {"a": "ok"}), "methods": ["random"], "n": 2,
            "prompts.limit": 2, "results_root": str(tmp_path),
            "reward": {"kind": "custom", "function": "openai_double:flaky_length", "retries": 2}})
        endpoints = {a.alias: attach(a.alias, a.endpoint) for a in cfg.agents}
        prompts = list(iter_prompts(cfg.prompts))
        store = Store(str(tmp_path))
        try:
            broken = run_batch(RunPlan(cfg, cfg.method_objects, "r1"), endpoints, "random", "b0", prompts)
            # Always raising: every response is a row with the error, no value, and no done marker.
            samples = query(store, "select * from samples")
            assert broken.reward_errors == 4 and broken.failed and samples.height == 4
            assert samples["reward"].null_count() == 4 and set(samples["reward_status"]) == {"error"}
            assert set(samples["reward_error"]) == {"RuntimeError: reward backend is down"}
            assert FLAKY["calls"] >= 3  # one backend call and 2 retries (each scores its items)
            rewards = query(store, "select status, value, error from rewards")
            assert set(rewards["status"]) == {"error"} and rewards["value"].null_count() == rewards.height
            assert not store.exists("done", "run=r1", "method=random", "b0.json")
            summary = query(store, "select reward_errors, best_reward from method_summary")
            assert summary.rows() == [(4, None)]  # the summary shows errors, not a reward of 0

            # Transient: the backend fails once more, then works; the rerun retries the failed
            # rewards (errors are not served from the record) and replays the model calls.
            FLAKY.update(broken=False, failures_left=1, calls=0)
            fixed = run_batch(RunPlan(cfg, cfg.method_objects, "r1"), endpoints, "random", "b0", prompts)
            assert not fixed.failed and fixed.calls_made == 0 and fixed.cached == 4
            samples = query(store, "select * from samples")
            assert set(samples["reward_status"]) == {"ok"} and samples["reward"].null_count() == 0
            assert FLAKY["calls"] >= 5  # the hiccup was retried within the run
            assert query(store, "select count(*) as n from rewards where status = 'ok'")["n"][0] == 4
            assert store.exists("done", "run=r1", "method=random", "b0.json")
        finally:
            close_engines()


# -- the call journal: a kill loses only the calls in flight ---------------------------------------
def test_rows_of_a_killed_writer_are_recovered_once_and_live_journals_are_left_alone(tmp_path):
    from toa.storage import ShardWriter

    # A writer in another process appends three rows (never flushed) and is killed with -9.
    code = ("import os, signal, sys; sys.path[:0] = [sys.argv[1]]; from helpers import call_row; "
            "from toa.storage import Store, ShardWriter; w = ShardWriter(Store(sys.argv[2]), 'calls', 'batch=b', "
            "flush_s=1e9); [w.append(call_row(f'k{i}', float(i))) for i in range(3)]; os.kill(os.getpid(), signal.SIGKILL)")
    proc = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent), str(tmp_path)])
    assert proc.returncode == -signal.SIGKILL
    store = Store(str(tmp_path))
    assert store.read("calls").height == 0 and len(list(tmp_path.rglob("journal-*.jsonl"))) == 1
    live = ShardWriter(store, "calls", "batch=b", flush_s=1e9)  # the next writer recovers them
    assert sorted(store.read("calls")["call_key"]) == ["k0", "k1", "k2"]
    assert list(tmp_path.rglob("journal-*.jsonl")) == []
    live.append(call_row("k3", 3.0))  # a live writer's journal is not taken by a second writer
    ShardWriter(store, "calls", "batch=b")
    assert store.read("calls").height == 3
    live.flush()
    assert sorted(store.read("calls")["call_key"]) == ["k0", "k1", "k2", "k3"]
    # Killed between writing a shard and removing its journal: nothing is written twice.
    (tmp_path / "calls" / "batch=b" / "journal-x.jsonl").write_text(json.dumps(call_row("k3", 3.0)) + "\n{\"trunc")
    assert ShardWriter(store, "calls", "batch=b").written == 0
    assert store.read("calls").height == 4 and list(tmp_path.rglob("journal-*.jsonl")) == []


# -- a misbehaving model server -----------------------------------------------------------------
@pytest.mark.integration
def test_misbehaving_server_is_retried_recorded_reported_then_filled(prefect_api, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from toa.flows.synthesize import toa

    modes = {"down": "500", "hangs": "hang", "drops": "close"}
    retries, timeout_s = 2, 0.5
    with OpenAIDouble(KEY, hang_s=timeout_s * 4) as double:
        overrides = {"agents": double_agents(double, modes, timeout_s=timeout_s, retries=retries),
                     "batch_size": 2, "task_retries": 0,
                     "reward": {"kind": "custom", "function": "openai_double:length"}}

        def run():
            return toa(methods=["parallel_ensemble"], n=1, limit=2, results_root=str(tmp_path), overrides=overrides)

        with pytest.raises(RuntimeError) as failed:
            run()
        store = Store(str(tmp_path))
        batch = query(store, "select distinct batch from samples")["batch"][0]
        assert "1 of 1 batches failed" in str(failed.value) and f"parallel_ensemble/{batch}" in str(failed.value)
        assert "5 failed calls" not in str(failed.value) and "6 failed calls" in str(failed.value)

        # Every request was tried 1 + retries times, with growing pauses between the tries.
        for mode in modes.values():
            per_prompt: dict[str, list[float]] = {}
            for m, t, body in double.requests:
                if m == mode:
                    per_prompt.setdefault(body["messages"][-1]["content"], []).append(t)
            assert [len(ts) for ts in per_prompt.values()] == [retries + 1] * 2, mode
            for ts in per_prompt.values():
                gaps = [b - a for a, b in zip(ts, ts[1:])]
                # backoff 0.5 s * 2**attempt with jitter x0.5..1.5 (plus the timeout for "hang")
                assert all(g >= 0.5 * 2**i * 0.5 - 0.02 for i, g in enumerate(gaps)), (mode, gaps)

        # ... then recorded as failed calls with a message naming what went wrong.
        errors = query(store, "select agent, error from call_attempts where status = 'error'")
        assert errors.height == 6 and errors["error"].null_count() == 0
        expected = {"down": r"^InternalServerError 500: ", "hangs": r"^APITimeoutError: ", "drops": r"^APIConnectionError: "}
        for agent, error in errors.iter_rows():
            assert re.match(expected[agent], error), (agent, error)
        summary = query(store, "select generations, generation_errors from method_summary")
        assert summary.rows() == [(6, 6)]
        with get_client(sync_client=True) as client:
            run_id = query(store, "select distinct run_id from samples")["run_id"][0]
            artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=[f"toa-summary-{run_id}"])))
        table = json.loads(artifacts[0].data) if isinstance(artifacts[0].data, str) else artifacts[0].data
        assert table[0]["generation_errors"] == 6  # the published summary shows the failures
        assert not (tmp_path / "done").exists()

        # The server recovers: a later run makes exactly the failed calls and finishes.
        double.healed = True
        seen = len(double.requests)
        result = run()
        assert len(double.requests) - seen == 6
        assert result["failed_batches"] == [] and result["summary"][0]["generation_errors"] == 0
        assert result["summary"][0]["new_calls"] == 6
        attempts = query(store, """select count(*) filter (where status = 'ok') as ok,
                                          count(*) filter (where status = 'error') as err,
                                          count(distinct call_key) as keys from call_attempts""")
        assert attempts.rows() == [(6, 6, 6)]  # the same six keys: first failed, then filled
        assert query(store, "select count(*) as n from calls where status = 'ok'")["n"][0] == 6


# -- kill -9 at random points -------------------------------------------------------------------
N_PROMPTS, N, KILLS, MAX_CONC = 12, 2, 5, 4
METHODS = ("random", "toa")
GENERATIONS = N_PROMPTS * N * 2 * len(METHODS)  # budget n * agents per prompt and method


def kill_run_file(path: Path, root: Path, endpoints) -> Path:
    lines = [f"results_root = {json.dumps(str(root))}", f"methods = {json.dumps(list(METHODS))}", f"n = {N}",
             "batch_size = 4", "seed = 7", "[prompts]", f"limit = {N_PROMPTS}", "[method_options.toa]", "width = 2"]
    for alias, ep in endpoints.items():
        lines += ["[[agents]]", f'alias = "{alias}"', f"max_concurrency = {MAX_CONC}", "[agents.endpoint]",
                  f'base_url = "{ep.base_url}"', f'model = "{ep.model}"', f'api_key_env = "TOA_KILL_KEY_{alias.upper()}"',
                  "[agents.sampling]", "max_tokens = 16"]
    path.write_text("\n".join(lines) + "\n")
    return path


def server_metrics(endpoints) -> tuple[float, float]:
    """(requests finished, requests running or waiting) summed over the vLLM servers, from
    their Prometheus /metrics (finished counts every generation, aborted ones included)."""
    done = busy = 0.0
    for ep in endpoints.values():
        req = urllib.request.Request(ep.base_url.removesuffix("/v1") + "/metrics",
                                     headers={"Authorization": f"Bearer {ep.api_key.get_secret_value()}"})
        for line in urllib.request.urlopen(req, timeout=10).read().decode().splitlines():
            if line.startswith("vllm:request_success_total"):
                done += float(line.rsplit(" ", 1)[1])
            elif line.startswith(("vllm:num_requests_running", "vllm:num_requests_waiting")):
                busy += float(line.rsplit(" ", 1)[1])
    return done, busy


def shards(root: Path) -> int:
    """Data shards written so far (not the empty schema shards a run creates first)."""
    return sum(1 for t in ("calls", "rewards", "samples") for f in (root / t).rglob("*.parquet")
               if f.name != "_schema.parquet")


@pytest.mark.integration
@pytest.mark.timeout(3000)  # 5 kills (each waits up to 300 s) and a rerun of up to 900 s
def test_kill9_at_random_points_then_rerun_loses_and_repeats_nothing(prefect_api, embedded_servers, tmp_path):
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    for alias, ep in embedded_servers.items():
        env[f"TOA_KILL_KEY_{alias.upper()}"] = ep.api_key.get_secret_value()
    root = tmp_path / "results"
    run_file = kill_run_file(tmp_path / "run.toml", root, embedded_servers)
    cmd = [sys.executable, "-m", "toa.cli", "run", "--config", str(run_file)]
    rng = random.Random(20261121)
    served_before, _ = server_metrics(embedded_servers)
    in_flight_total, kills = 0.0, []
    for k in range(KILLS):
        start_shards = shards(root)
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        deadline, history = time.monotonic() + 300, []
        while shards(root) <= start_shards:  # wait for this attempt's first progress (a new shard)
            assert proc.poll() is None, f"toa run ended before kill {k + 1}:\n{proc.stdout.read().decode()[-3000:]}"
            assert time.monotonic() < deadline, "no progress in time"
            history.append((time.monotonic(), *server_metrics(embedded_servers)))
            time.sleep(0.2)  # polling progress, not waiting for readiness
        delay_end = time.monotonic() + rng.uniform(0.0, 3.0)
        while time.monotonic() < delay_end:  # a random point after progress, still sampling metrics
            history.append((time.monotonic(), *server_metrics(embedded_servers)))
            time.sleep(0.2)
        assert proc.poll() is None, f"the run finished before kill {k + 1}: make the workload larger"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        now, done_now, _ = history[-1]
        # What a kill may cost again: the generations in flight (the most seen in its last
        # second). Finished ones are in the journal even when not yet in a shard.
        in_flight = max(b for t, _, b in history if t >= now - 1.0)
        recently_done = done_now - min(d for t, d, _ in history if t >= now - 3.0)
        in_flight_total += in_flight
        kills.append({"kill": k + 1, "shards": shards(root), "in_flight": in_flight, "done_in_last_3s": recently_done})

    final = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert final.returncode == 0, final.stdout[-3000:] + final.stderr[-3000:]
    deadline = time.monotonic() + 60
    while server_metrics(embedded_servers)[1] > 0:  # aborted requests of the last kill settle
        assert time.monotonic() < deadline
        time.sleep(0.2)
    served = server_metrics(embedded_servers)[0] - served_before
    # each `toa run` process asks every attached endpoint one identity probe (toa.identity): a
    # generation the server counts that is no model call
    probes = (KILLS + 1) * len(embedded_servers)
    repeated = served - probes - GENERATIONS
    print(f"\nkill -9 x{KILLS}: {kills}\nserver generations {served:.0f} ({probes} identity probes) for "
          f"{GENERATIONS} distinct call keys: {repeated:.0f} repeated; in flight at the kills: {in_flight_total:.0f}")

    store = Store(str(root))
    samples = query(store, "select method, prompt_id, count(*) as n, count(*) filter (where status = 'ok' "
                           "and reward_status = 'ok') as good from samples group by all")
    assert samples.height == N_PROMPTS * len(METHODS)  # every prompt, every method
    assert (samples["n"] == N * 2).all() and (samples["good"] == N * 2).all()
    dup = query(store, "select count(*) as n, count(distinct (method, sample_id)) as k from samples")
    assert dup["n"][0] == dup["k"][0] == GENERATIONS
    attempts = query(store, "select count(*) as n, count(distinct call_key) as k, "
                            "count(*) filter (where status <> 'ok') as bad from call_attempts")
    assert attempts.rows() == [(GENERATIONS, GENERATIONS, 0)]  # no call recorded twice
    rewards = query(store, "select count(*) as n, count(distinct reward_key) as k from (select * from "
                           "read_parquet(? || '/rewards/**/*.parquet'))", [str(root)])
    assert rewards["n"][0] == rewards["k"][0]
    for table in ("sft", "dpo"):
        per_method = dict(query(store, f"select method, count(*) as n from {table} group by 1").iter_rows())
        assert set(per_method) == set(METHODS) and all(v > 0 for v in per_method.values()), (table, per_method)
    assert query(store, "select count(*) as n from sft")["n"][0] == N_PROMPTS * len(METHODS)
    assert len(list((root / "done").rglob("*.json"))) == len(METHODS) * N_PROMPTS // 4
    assert 0 <= repeated <= in_flight_total
