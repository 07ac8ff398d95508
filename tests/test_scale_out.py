"""Scale-out: the same `toa` flow with its (method, batch) tasks on a real Dask LocalCluster of
two worker processes (prefect-dask), against the session's real vLLM CPU servers and a real
Prefect API; then the single-process run must agree with it.

Model servers are not bit-reproducible across batch compositions, so the comparison replays:
only the call record (calls/) of the Dask run is copied to a fresh results root and the flow
runs there on the default thread runner; it must make zero model calls and produce the same
samples, SFT and DPO rows (same ids and texts, rewards within 1e-6; rewards are recomputed).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time

import pytest
from helpers import attached_agents
from pydantic import SecretStr
from toa.batches import BatchRef

from toa.config import ConfigError, load_config
from toa.db import query
from toa.plan import plan_run, run_id
from toa.runners import build_task_runner, shared_results_root
from toa.servers import Endpoint
from toa.storage import Store

integration = pytest.mark.integration

N_PROMPTS, N, BATCH = 4, 1, 2  # 2 batches x 2 methods = 4 tasks, 16 generations
METHODS = ["random", "parallel_ensemble"]
DASK = {"kind": "dask", "n_workers": 2, "threads_per_worker": 1, "cluster_kwargs": {"dashboard_address": None}}
EXACT = {  # per table: columns that must be equal, and the float columns compared within 1e-6
    "samples": (["run_id", "method", "batch", "prompt_id", "sample_id", "order", "agent", "action", "parent_id",
                 "depth", "text", "finish_reason", "prompt_tokens", "completion_tokens", "status", "reward_status"],
                ["reward"]),
    "sft": (["run_id", "method", "prompt_id", "prompt", "response", "agent", "action", "sample_id", "n_samples"],
            ["reward"]),
    "dpo": (["run_id", "method", "prompt_id", "chosen", "rejected", "chosen_id", "rejected_id", "rejected_rank"],
            ["chosen_reward", "rejected_reward"]),
}


def run_flow(root: str, endpoints, task_runner: dict | None) -> dict:
    from toa.flows.synthesize import toa

    overrides = {"batch_size": BATCH, "agents": attached_agents(endpoints, max_tokens=16)}
    if task_runner:
        overrides["task_runner"] = task_runner
    return toa(n=N, limit=N_PROMPTS, methods=METHODS, results_root=root, overrides=overrides)


@pytest.fixture(scope="module")
def runs(prefect_api, embedded_servers, tmp_path_factory):
    dask_root = str(tmp_path_factory.mktemp("dask-run"))
    started = time.perf_counter()
    on_dask = run_flow(dask_root, embedded_servers, DASK)
    dask_s = time.perf_counter() - started
    local_root = str(tmp_path_factory.mktemp("local-replay"))
    shutil.copytree(os.path.join(dask_root, "calls"), os.path.join(local_root, "calls"))
    local = run_flow(local_root, embedded_servers, None)
    print(f"dask run {dask_s:.1f}s, local replay {time.perf_counter() - started - dask_s:.1f}s")
    return on_dask, dask_root, local, local_root


def workers(root: str, run_id: str) -> set[str]:
    """host:pid of the processes that ran each batch, from the done markers."""
    store = Store(root)
    markers = store.fs.glob(store.path("done", f"run={run_id}", "**", "*.json"))
    assert len(markers) == len(METHODS) * (N_PROMPTS // BATCH)
    return {json.loads(store.fs.cat_file(m))["worker"] for m in markers}


@integration
def test_batches_ran_in_two_worker_processes(runs):
    on_dask, dask_root, local, local_root = runs
    here = f"{socket.gethostname()}:{os.getpid()}"
    on_workers = workers(dask_root, on_dask["run_id"])
    assert len(on_workers) >= 2 and here not in on_workers
    assert workers(local_root, local["run_id"]) == {here}  # the default runner: threads in this process
    # The temporary cluster's worker processes are gone with the run (no orphans left behind).
    pids = [int(w.rsplit(":", 1)[1]) for w in on_workers]
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(p) for p in pids)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@integration
def test_dask_run_is_complete(runs):
    on_dask, *_ = runs
    assert on_dask["failed_batches"] == []
    for row in on_dask["summary"]:
        assert row["prompts"] == N_PROMPTS and row["generation_errors"] == 0 and row["reward_errors"] == 0
        assert row["new_calls"] == N_PROMPTS * N * 2 and row["replayed"] == 0


@integration
def test_single_process_replay_makes_no_calls(runs):
    on_dask, _, local, _ = runs
    assert local["run_id"] == on_dask["run_id"]  # the task runner is operational: same fingerprint
    for row in local["summary"]:
        assert row["new_calls"] == 0 and row["replayed"] == N_PROMPTS * N * 2


@integration
@pytest.mark.parametrize("table", list(EXACT))
def test_same_rows_as_single_process(runs, table):
    on_dask, dask_root, local, local_root = runs
    exact, floats = EXACT[table]
    key = [c for c in ("method", "prompt_id", "sample_id", "chosen_id", "rejected_id") if c in exact]
    got = {name: query(Store(root), f"select * from {table} where run_id = ?", [on_dask["run_id"]]).sort(key)
           for name, root in (("dask", dask_root), ("local", local_root))}
    assert got["dask"].height > 0 and got["dask"].height == got["local"].height
    assert got["dask"].select(exact).equals(got["local"].select(exact))
    for col in floats:
        diff = (got["dask"][col] - got["local"][col]).abs()
        assert diff.max() <= 1e-6, f"{table}.{col} differs by {diff.max()}"
    if table == "samples":
        assert got["dask"]["text"].str.len_chars().min() > 0 and got["dask"]["status"].eq("ok").all()
        assert set(got["dask"]["method"]) == set(METHODS)
        assert not got["dask"]["cached"].any() and got["local"]["cached"].all()


# -- unit tests: no cluster, no servers ----------------------------------------------------------

def test_task_runner_is_operational_and_validated():
    assert run_id(load_config(None, {"task_runner": DASK})) == run_id(load_config())
    for bad, says in [({"task_runner.address": "tcp://head:8786"}, "only apply to kind 'dask'"),
                      ({"task_runner": {"kind": "dask", "address": "tcp://head:8786", "n_workers": 2}}, "existing cluster"),
                      ({"task_runner": {"kind": "dask", "max_workers": 4}}, "max_workers only applies"),
                      ({"task_runner.kind": "ray"}, "task_runner.kind")]:
        with pytest.raises(ConfigError, match=says):
            load_config(None, bad)


def test_build_task_runner():
    from prefect.task_runners import ThreadPoolTaskRunner
    from prefect_dask import DaskTaskRunner

    threads = build_task_runner(load_config(None, {"task_runner.max_workers": 3}).task_runner)
    assert isinstance(threads, ThreadPoolTaskRunner) and threads._max_workers == 3
    local = build_task_runner(load_config(None, {"task_runner": DASK}).task_runner)
    assert isinstance(local, DaskTaskRunner) and local.address is None
    assert local.cluster_kwargs == {"n_workers": 2, "threads_per_worker": 1, "dashboard_address": None}
    remote = build_task_runner(load_config(None, {"task_runner": {"kind": "dask", "address": "tcp://head:8786"}}).task_runner)
    assert remote.address == "tcp://head:8786" and remote.cluster_kwargs == {}


def test_task_arguments_pickle_with_their_secrets():
    """Dask ships a task's arguments to worker processes by pickling them."""
    import cloudpickle

    plan = plan_run(load_config(None, {"task_runner": DASK, "methods": ["random", "toa"], "n": 3}))
    endpoint = Endpoint(alias="a", base_url="http://gpu-1:8000/v1", model="m", api_key=SecretStr("sk-1"), identity="m@1")
    args = (plan, {"a": endpoint}, "random", BatchRef(key="k", source="s", size=2), "owner")
    back = cloudpickle.loads(cloudpickle.dumps(args))
    assert back == args and back[1]["a"].api_key.get_secret_value() == "sk-1"
    assert "sk-1" not in repr(back[1])


def test_shared_results_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert shared_results_root("results") == str(tmp_path / "results")
    assert shared_results_root("s3://bucket/toa") == "s3://bucket/toa"
    assert shared_results_root("/nfs/toa") == "/nfs/toa"
