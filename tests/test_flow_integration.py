"""End to end: the `toa` flow on real vLLM CPU servers (the two embedded models), a real
Prefect API (prefect_test_harness), real Parquet shards and a real DuckDB database; then the
same run again, which must make zero model calls and give identical datasets."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from toa.db import query
from toa.storage import Store

pytestmark = pytest.mark.integration

N_PROMPTS, N = 4, 2


def vllm_processes(ports: list[int]) -> list[int]:
    """PIDs of vLLM servers listening on these ports (other tests may run servers of their own)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                args = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"vllm.entrypoints.openai.api_server" in args and any(
                    args[i + 1] == str(p).encode() for i, a in enumerate(args[:-1]) if a == b"--port" for p in ports):
                pids.append(int(proc.name))
    return pids


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("results"))


def run_flow(root: str) -> dict:
    from toa.flows.synthesize import toa

    return toa(n=N, limit=N_PROMPTS, results_root=root,
               overrides={"batch_size": 2, "agents.0.sampling.max_tokens": 32, "agents.1.sampling.max_tokens": 32})


@pytest.fixture(scope="module")
def first(prefect_api, root) -> dict:
    return run_flow(root)


def test_every_sample_is_stored_with_tokens_and_a_reward(first, root):
    store = Store(root)
    samples = query(store, "select * from samples where run_id = ?", [first["run_id"]])
    assert samples.height == 2 * N_PROMPTS * N * 2  # two methods, budget n * agents each
    assert set(samples["status"]) == {"ok"} and set(samples["reward_status"]) == {"ok"}
    assert (samples["completion_tokens"] > 0).all() and (samples["prompt_tokens"] > 0).all()
    assert samples["reward"].is_between(-1.0, 1.0).all() and samples["reward"].n_unique() > 1
    per_agent = {m: dict(samples.filter(pl.col("method") == m).group_by("agent").len().iter_rows())
                 for m in ("random", "parallel_ensemble")}
    assert per_agent["random"] == {"smollm2": N_PROMPTS * N * 2}  # one agent, N = n * M
    assert per_agent["parallel_ensemble"] == {"smollm2": N_PROMPTS * N, "gemma3": N_PROMPTS * N}


def test_calls_are_recorded_once_each(first, root):
    calls = query(Store(root), "select status, count(*) as n, count(distinct call_key) as k from call_attempts group by 1")
    assert calls.rows() == [("ok", 2 * N_PROMPTS * N * 2, 2 * N_PROMPTS * N * 2)]


def test_summary_and_datasets(first, root):
    summary = {r["method"]: r for r in first["summary"]}
    assert set(summary) == {"random", "parallel_ensemble"}
    for row in summary.values():
        assert row["prompts"] == N_PROMPTS and row["generations"] == N_PROMPTS * N * 2
        assert row["generation_errors"] == 0 and row["new_calls"] == N_PROMPTS * N * 2
        assert row["best_reward"] >= row["mean_reward"]
    store = Store(root)
    best = query(store, """select s.method, s.prompt_id, s.text, s.reward from samples s
                           join prompts_best b using (run_id, method, prompt_id)
                           where s.reward = b.best_reward and s.run_id = ?""", [first["run_id"]])
    sft = query(store, "select * from sft where run_id = ?", [first["run_id"]])
    assert sft.height == 2 * N_PROMPTS
    joined = sft.join(best, on=["method", "prompt_id"])
    assert (joined["response"] == joined["text"]).all() and (joined["reward"] == joined["reward_right"]).all()
    dpo = query(store, "select * from dpo where run_id = ?", [first["run_id"]])
    assert dpo.height > 0 and (dpo["chosen_reward"] > dpo["rejected_reward"]).all()
    assert set(dpo["method"]) <= {"random", "parallel_ensemble"}
    export = Path(root) / "exports" / f"run={first['run_id']}" / "parallel_ensemble" / "sft.jsonl"
    lines = [json.loads(x) for x in export.read_text().splitlines()]
    assert len(lines) == N_PROMPTS and lines[0]["messages"][1]["role"] == "assistant"


def test_servers_are_stopped_after_the_flow(first, root):
    runs = query(Store(root), "select models_json from runs where run_id = ?", [first["run_id"]])
    urls = [u for row in runs["models_json"] for u in json.loads(row)["base_urls"].values()]
    ports = [int(u.rsplit(":", 1)[1].split("/")[0]) for u in urls]
    assert len(ports) == 2 and vllm_processes(ports) == []


def test_rerun_makes_zero_model_calls_and_identical_datasets(first, root):
    store = Store(root)
    sft_before = query(store, "select * from sft order by method, prompt_id")
    second = run_flow(root)
    assert second["run_id"] == first["run_id"]
    assert all(r["new_calls"] == 0 for r in second["summary"])
    assert query(store, "select * from sft order by method, prompt_id").equals(sft_before)
    # Without the done markers the batches run again: every call is replayed from the record.
    store.fs.rm(store.path("done"), recursive=True)
    reward_records = store.read("rewards").height
    third = run_flow(root)
    assert store.read("rewards").height == reward_records  # every reward replayed from its record
    assert all(r["new_calls"] == 0 and r["replayed"] == N_PROMPTS * N * 2 for r in third["summary"])
    attempts = query(store, "select count(*) as n from call_attempts")["n"][0]
    assert attempts == 2 * N_PROMPTS * N * 2
    assert query(store, "select * from sft order by method, prompt_id").equals(sft_before)
