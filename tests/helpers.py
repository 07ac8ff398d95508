"""Plain helpers shared by test modules (test modules import these, never each other or conftest).

- attached_agents / launched_run_file / prefect_at: for the integration tests' real servers;
- write_run and its data (CONFIG, PROMPTS, ...): the hand-built run of the analysis views, also
  used by the report and export tests (described in test_analysis_sql.py);
- sample_row_dict / prompt_row_dict: full rows of the samples / prompts tables, every column
  filled with a sensible default, for tests that only care about a few columns;
- fake_cpu and the CPU flag sets: made-up machines for the launch decisions.
"""

from __future__ import annotations

import json
import subprocess
import time

import polars as pl

from toa.datasets import build_dpo, build_sft
from toa.rows import frame
from toa.servers.machine import CpuInfo
from toa.storage import Store


def attached_agents(endpoints, max_tokens: int = 32, key_env: bool = False) -> list[dict]:
    """Agent configs that attach to running endpoints (key inline, or via TOA_TEST_KEY_<ALIAS>)."""
    agents = []
    for alias, ep in endpoints.items():
        endpoint = {"base_url": ep.base_url, "model": ep.model}
        if key_env:
            endpoint["api_key_env"] = f"TOA_TEST_KEY_{alias.upper()}"
        else:
            endpoint["api_key"] = ep.api_key.get_secret_value()
        agents.append({"alias": alias, "endpoint": endpoint, "sampling": {"max_tokens": max_tokens}})
    return agents


def launched_run_file(tmp_path, alias: str):
    """A run file that launches one real vLLM CPU server (embedded SmolLM2) for a tiny run of 2
    prompts: (run file, results root). The alias names the server's processes for the test."""
    root = tmp_path / "results"
    run_file = tmp_path / "run.toml"
    run_file.write_text("\n".join([
        f"results_root = {json.dumps(str(root))}", 'methods = ["random"]', "n = 1", "[prompts]", "limit = 2",
        "[[agents]]", f'alias = "{alias}"', "[agents.launch]", 'model = "embedded:smollm2-135m-instruct"',
        "[agents.sampling]", "max_tokens = 16"]) + "\n")
    return run_file, root


def prefect_at(api_url: str):
    """Settings context that points this process's Prefect client at `api_url`."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    return temporary_settings({PREFECT_API_URL: api_url})


# --- the hand-built run (test_analysis_sql, test_exports, test_report) ---

CONFIG = {"name": "demo", "n": 2, "agents": [{"alias": "a"}, {"alias": "b"}], "methods": ["random", "toa"]}
PROMPTS = {"p1": "What is 2 + 2?", "p2": "Name a colour."}
REJECTED_RANK = 3


def sample(run_id, method, prompt, sid, order, agent, reward, *, parent=None, depth=0, latency=1.0,
           cached=False, failed=False, action=None):
    ok = not failed
    return {"run_id": run_id, "method": method, "batch": "b0", "prompt_id": prompt, "sample_id": sid,
            "order": order, "agent": agent, "action": action or agent, "parent_id": parent, "depth": depth,
            "text": f"answer {sid}" if ok else None, "finish_reason": "stop" if ok else None,
            "prompt_tokens": 10 if ok else 0, "completion_tokens": 5 if ok else 0, "latency_s": latency,
            "cached": cached, "status": "ok" if ok else "error", "error": None if ok else "boom",
            "reward": reward, "reward_status": "ok" if ok else "error", "reward_error": None}


def run_samples(run_id: str) -> list[dict]:
    r, t = "random", "toa"
    return [
        sample(run_id, r, "p1", "r1", 0, "a", 0.5, latency=1.0),
        sample(run_id, r, "p1", "r2", 1, "b", 0.1),
        sample(run_id, r, "p1", "r3", 2, "a", 0.9, latency=3.0),
        sample(run_id, r, "p1", "r4", 3, "b", None, failed=True),
        sample(run_id, r, "p2", "r5", 0, "a", 0.4, latency=2.0, cached=True),
        sample(run_id, r, "p2", "r6", 1, "b", 0.4),
        sample(run_id, t, "p1", "t1", 0, "a", 0.3, depth=2),
        sample(run_id, t, "p1", "t2", 1, "b", 0.6, parent="t1", depth=4),
        sample(run_id, t, "p1", "t3", 2, "a", 0.2, parent="t2", depth=6),
        sample(run_id, t, "p1", "t4", 3, "b", 0.7, parent="t1", depth=4),
        sample(run_id, t, "p2", "method-error:p2", -1, "", None, failed=True, action="method_error"),
    ]


def call(key, status, created):
    return {"call_key": key, "prompt_id": "p1", "agent": "b", "model": "m", "request_json": "{}", "seed": 0,
            "slot": 0, "text": "x" if status == "ok" else None, "prompt_tokens": 10, "completion_tokens": 5,
            "latency_s": 0.5 * created, "status": status, "error": None if status == "ok" else "boom",
            "created_at": float(created), "logprob": None,
            "finish_reason": "stop" if status == "ok" else None}


def write_run(store: Store, run_id: str = "run1", with_runs_row: bool = True) -> None:
    """Every table the views read, for one run, as the flow would shard it."""
    samples = frame("samples", run_samples(run_id))
    prompts = frame("prompts", [{"prompt_id": p, "text": t, "source": "s", "line": i, "batch": "b0",
                                 "reference": None} for i, (p, t) in enumerate(PROMPTS.items(), 1)])
    store.write_frame(samples, store.path("samples", f"run={run_id}", "b0.parquet"))
    store.write_frame(prompts, store.path("prompts", "source=s", "b0.parquet"))
    nodes = [{"run_id": run_id, "method": "toa", "batch": "b0", "prompt_id": "p1", "node_id": f"n{i}",
              "parent_id": None if i == 0 else "n0", "kind": "root" if i == 0 else "agent", "agent": None,
              "depth": 0 if i == 0 else 1, "visits": 1, "value": None, "n_values": 0, "sample_id": None,
              "created": i} for i in range(3)]
    store.write_frame(frame("tree_nodes", nodes), store.path("tree_nodes", f"run={run_id}", "b0.parquet"))
    # b's failed sample r4 took two failed attempts; r2 one good one (a's calls are not stored)
    calls = [call("r4", "error", 1), call("r4", "error", 2), call("r2", "ok", 3)]
    store.write_frame(frame("calls", calls), store.path("calls", "batch=b0", f"{run_id}.parquet"))
    if with_runs_row:
        store.write_rows("runs", [{"run_id": run_id, "started_at": 1.0, "config_json": json.dumps(CONFIG),
                                   "models_json": "{}", "reward_id": "rm"}], f"run={run_id}", "1.parquet")
    for method in ("random", "toa"):
        mine = samples.filter(pl.col("method") == method)
        store.write_frame(build_sft(mine, prompts), store.path("sft", f"run={run_id}", f"{method}.parquet"))
        store.write_frame(build_dpo(mine, prompts, REJECTED_RANK), store.path("dpo", f"run={run_id}", f"{method}.parquet"))


def call_row(key: str, t: float = 1.0) -> dict:
    """A recorded model call (one `calls` row) that succeeded, for the call journal tests."""
    return {"call_key": key, "prompt_id": "p", "agent": "a", "model": "m", "request_json": "{}", "seed": 1,
            "slot": 0, "text": "hi", "finish_reason": "stop", "prompt_tokens": 1, "completion_tokens": 1,
            "latency_s": 0.1, "status": "ok", "error": None, "created_at": t, "logprob": None}


# --- full rows with defaults (frame rejects a dict row that lacks a column) ---

def sample_row_dict(**overrides) -> dict:
    """A `samples` row of a successful, scored generation; `overrides` set any of its columns
    (an unknown column is a mistake, caught here rather than by `frame`)."""
    row = {"run_id": "r", "method": "m", "batch": "b", "prompt_id": "p", "sample_id": "s", "order": 0,
           "agent": "a", "action": "a", "parent_id": None, "depth": 0, "text": "answer",
           "finish_reason": "stop", "prompt_tokens": 1, "completion_tokens": 1, "latency_s": 0.0,
           "cached": False, "status": "ok", "error": None, "reward": None, "reward_status": "ok",
           "reward_error": None}
    if unknown := set(overrides) - set(row):
        raise TypeError(f"not samples columns: {sorted(unknown)}")
    return {**row, **overrides}


def prompt_row_dict(**overrides) -> dict:
    """A `prompts` row (no reference, from source "s", batch "b"); `overrides` set its columns."""
    row = {"prompt_id": "p", "text": "Q?", "reference": None, "source": "s", "line": 0, "batch": "b"}
    if unknown := set(overrides) - set(row):
        raise TypeError(f"not prompts columns: {sorted(unknown)}")
    return {**row, **overrides}


# --- made-up CPUs (test_machine, test_doctor) ---

# /proc/cpuinfo flags of the two machines this project met (trimmed to what matters)
AMD_EPYC_AVX2 = frozenset("fpu sse sse2 avx avx2 fma f16c bmi2".split())
INTEL_AMX = frozenset("fpu sse sse2 avx avx2 fma avx512f avx512_bf16 amx_bf16 amx_tile avx512_vnni".split())
INTEL_AVX512_NO_BF16 = frozenset("avx avx2 fma avx512f avx512_vnni".split())


def fake_cpu(flags=INTEL_AMX, cores=(0, 1), arch="x86_64") -> CpuInfo:
    return CpuInfo(model="test CPU", arch=arch, flags=frozenset(flags), cores=tuple(cores))


def wait_until(condition, timeout_s: float, what: str, proc: subprocess.Popen | None = None) -> None:
    """Poll `condition` until it holds (no fixed sleeps for readiness); fail after `timeout_s`,
    or at once when `proc` (a `toa run` with its output piped) has ended, showing its output."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"toa run ended before {what}:\n{proc.stdout.read().decode()[-3000:]}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
