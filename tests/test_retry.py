"""Retry from the UI redoes only what failed. A deployment run (the real server + worker of
deployments/local.sh) samples from a vLLM server of our own; the server is killed once some
calls are recorded, so the flow run ends Failed. The server comes back on the same port with
the same key, the SAME flow run is retried with `prefect flow-run retry` (what the UI's Retry
button does: the run goes back to Scheduled and a worker picks it up), and it must complete
making only the calls that had not succeeded, with no duplicate rows."""

from __future__ import annotations

import asyncio
import secrets
import subprocess
import time
from pathlib import Path

import pytest
from helpers import prefect_at

from toa.db import query
from toa.servers import LaunchSpec, ServerHandle, start_vllm
from toa.servers.vllm import free_port
from toa.storage import Store

# local.sh up may take 600 s (once), then waits of up to 300 + 300 + 120 + 300 s
pytestmark = [pytest.mark.integration, pytest.mark.timeout(1800)]

N_PROMPTS, N = 8, 2
TOTAL = N_PROMPTS * N  # random, one agent: n samples per prompt, one call each


def start_server(port: int, key: str, log_dir: Path) -> ServerHandle:
    """SmolLM2 on a fixed port and key, so a restarted server is the 'same' endpoint."""
    return start_vllm("flaky", LaunchSpec(model="embedded:smollm2-135m-instruct"), log_dir, port=port, api_key=key)


def attempts(root: Path) -> dict[str, int]:
    if not (root / "calls").exists():
        return {"ok": 0, "error": 0, "ok_keys": 0}
    rows = query(Store(str(root)), """select count(*) filter (status = 'ok') as ok, count(*) filter (status <> 'ok') as error,
                                             count(distinct call_key) filter (status = 'ok') as ok_keys from call_attempts""")
    return rows.to_dicts()[0]


def ok_keys(root: Path) -> set[str]:
    return set(query(Store(str(root)), "select call_key from call_attempts where status = 'ok'")["call_key"])


def recorded_ok(root: Path) -> int:
    import polars as pl

    files = list((root / "calls").rglob("part-*.parquet"))
    return sum(pl.read_parquet(f).filter(pl.col("status") == "ok").height for f in files) if files else 0


def flow_run(api_url: str, run_id):
    from prefect.client.orchestration import get_client

    async def read():
        async with get_client() as client:
            return await client.read_flow_run(run_id)

    with prefect_at(api_url):
        return asyncio.run(read())


def wait_state(api_url: str, run_id, want: set[str], timeout_s: float):
    deadline = time.monotonic() + timeout_s
    while True:
        run = flow_run(api_url, run_id)
        if run.state is not None and run.state.type.value in want:
            return run
        assert time.monotonic() < deadline, f"flow run still {run.state.type.value if run.state else None}"
        time.sleep(0.5)  # polling the API for a state, with a deadline


def test_retry_redoes_only_unfinished_calls(local_deployment, tmp_path):
    from prefect.deployments import run_deployment
    from toa.blocks import ModelEndpoint

    api_url, root = local_deployment["api_url"], tmp_path / "results"
    port, key = free_port(), secrets.token_urlsafe(24)
    server = start_server(port, key, tmp_path)
    try:
        with prefect_at(api_url):
            ModelEndpoint(base_url=server.endpoint.base_url, model="flaky", api_key=key).save("flaky", overwrite=True)
            # fail fast once the server is gone: no request retries, no task retries, short timeout;
            # one request at a time so the kill lands mid-run
            agent = {"alias": "flaky", "block": "flaky", "retries": 0, "timeout_s": 20, "max_concurrency": 1,
                     "sampling": {"max_tokens": 48}}
            run = run_deployment("toa/synthesize", timeout=0, parameters={
                "methods": ["random"], "n": N, "limit": N_PROMPTS, "results_root": str(root),
                "overrides": {"agents": [agent], "batch_size": 2, "task_retries": 0, "prompt_concurrency": 1}})
        deadline = time.monotonic() + 300
        while recorded_ok(root) < 3:
            state = flow_run(api_url, run.id).state
            assert not state.is_final(), f"flow run ended before the kill: {state.type.value} {state.message}"
            assert time.monotonic() < deadline, "no calls recorded in time"
            time.sleep(0.2)  # polling the shards
        server.stop(timeout_s=0.1)  # the server dies mid-run
        failed = wait_state(api_url, run.id, {"FAILED", "CRASHED", "COMPLETED"}, 300)
        assert failed.state.type.value == "FAILED", failed.state.message
        before = attempts(root)
        done_before = ok_keys(root)
        assert 0 < before["ok"] < TOTAL and before["ok"] == before["ok_keys"], before

        server = start_server(port, key, tmp_path)  # back on the same port, same key
        retry = subprocess.run([str(Path(local_deployment["env"]["TOA_VENV"]) / "bin" / "prefect"),
                                "flow-run", "retry", str(run.id)], env=local_deployment["env"],
                               capture_output=True, text=True, timeout=120)
        assert retry.returncode == 0, retry.stdout + retry.stderr
        done = wait_state(api_url, run.id, {"COMPLETED", "FAILED", "CRASHED"}, 300)
        assert done.state.type.value == "COMPLETED", done.state.message
        assert done.id == run.id and done.run_count >= 2  # the same flow run, run again
    finally:
        server.stop()

    after = attempts(root)
    assert after["ok"] == after["ok_keys"] == TOTAL, after  # every call made once, none twice
    made_by_retry = after["ok"] + after["error"] - before["ok"] - before["error"]
    assert made_by_retry == TOTAL - before["ok"]  # only the unfinished calls were made again
    print(f"retry: {before['ok']} ok + {before['error']} failed calls before, {made_by_retry} made by the retry, {TOTAL} in all")
    assert done_before < ok_keys(root)
    store = Store(str(root))
    samples = query(store, "select count(*) as n, count(distinct (run_id, method, prompt_id, sample_id)) as k, "
                           "count(*) filter (status = 'ok' and reward_status = 'ok') as good from samples").rows()
    assert samples == [(TOTAL, TOTAL, TOTAL)]  # no duplicate rows; the failed rows were replaced
    assert query(store, "select count(*) as n from sft")["n"][0] == N_PROMPTS
