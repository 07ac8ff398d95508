"""The deployment path for real: deployments/local.sh starts a Prefect server, the process work
pool, toa's block types, the `synthesize` deployment from prefect.yaml and a worker (the
session fixture `local_deployment`); then `local.sh run` runs the deployment with parameters
to completion. The run names blocks only: ModelEndpoint blocks (keys as secrets) for the two
embedded vLLM servers, a RewardModel block and a ResultsLocation block, so no key ever
appears in the flow run's parameters. The nightly schedule is checked through the API, and
switched on and off with the CLI commands the README gives."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import polars as pl
import pytest
import yaml
from helpers import prefect_at

from toa.db import query
from toa.storage import Store

# local.sh up may take 600 s (once), a deployment run up to 600 s
pytestmark = [pytest.mark.integration, pytest.mark.timeout(1800)]

PROJECT = Path(__file__).resolve().parents[1]
N_PROMPTS = 2


def save_endpoint_blocks(endpoints) -> list[dict]:
    from toa.blocks import ModelEndpoint

    agents = []
    for alias, ep in endpoints.items():
        ModelEndpoint(base_url=ep.base_url, model=ep.model, api_key=ep.api_key).save(f"test-{alias}", overwrite=True)
        agents.append({"alias": alias, "block": f"test-{alias}", "sampling": {"max_tokens": 16}})
    return agents


def prefect_cli(deployment, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    exe = Path(deployment["env"]["TOA_VENV"]) / "bin" / "prefect"
    return subprocess.run([str(exe), *args], env=deployment["env"], capture_output=True, text=True, timeout=timeout)


def read_deployment(api_url: str):
    from prefect.client.orchestration import get_client

    async def read():
        async with get_client() as client:
            return await client.read_deployment_by_name("toa/synthesize")

    import asyncio

    with prefect_at(api_url):
        return asyncio.run(read())


def test_deployment_run_with_blocks_completes(local_deployment, embedded_servers, tmp_path):
    from toa.blocks import ResultsLocation, RewardModel

    root = tmp_path / "results"
    with prefect_at(local_deployment["api_url"]):
        agents = save_endpoint_blocks(embedded_servers)
        RewardModel(kind="similarity", model="embedded:all-minilm-l6-v2").save("test-reward", overwrite=True)
        ResultsLocation(url=str(root), storage_options={"auto_mkdir": True}).save("test-results", overwrite=True)
    overrides = {"agents": agents, "reward.block": "test-reward", "results_block": "test-results", "batch_size": 1}
    run = subprocess.run(
        ["bash", str(local_deployment["script"]), "run", "--param", f"limit={N_PROMPTS}", "--param", "n=1",
         "--param", 'methods=["random", "parallel_ensemble"]', "--param", f"overrides={json.dumps(overrides)}"],
        env=local_deployment["env"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, f"{run.stdout[-4000:]}\n{run.stderr[-4000:]}"
    assert "Completed" in run.stdout + run.stderr

    store = Store(str(root))  # the results went where the ResultsLocation block says
    samples = query(store, "select method, agent, status, reward_status from samples")
    assert samples.height == 2 * N_PROMPTS * 2  # two methods, n * agents each
    assert set(samples["status"]) == {"ok"} and set(samples["reward_status"]) == {"ok"}
    assert dict(samples.filter(pl.col("method") == "parallel_ensemble").group_by("agent").len().iter_rows()) == {
        "smollm2": N_PROMPTS, "gemma3": N_PROMPTS}
    config = json.loads(query(store, "select config_json from runs")["config_json"][0])
    assert config["results_root"] == str(root) and config["reward"]["kind"] == "similarity"
    assert config["reward"]["block"] is None  # resolved before the fingerprint was taken
    # keys travel in blocks only: neither the stored flow-run parameters nor the record hold one
    keys = [ep.api_key.get_secret_value() for ep in embedded_servers.values()]
    runs = query(store, "select config_json, models_json from runs")
    assert not any(k in json.dumps(runs.to_dicts()) for k in keys)
    assert not any(k in json.dumps(overrides) for k in keys)


def test_nightly_schedule_is_deployed_paused_with_its_parameters(local_deployment):
    shipped = yaml.safe_load((PROJECT / "prefect.yaml").read_text())["deployments"][0]["schedules"][0]
    deployment = read_deployment(local_deployment["api_url"])
    assert len(deployment.schedules) == 1
    schedule = deployment.schedules[0]
    assert schedule.schedule.cron == "0 2 * * *" and schedule.schedule.timezone == "UTC"
    assert schedule.active is False and schedule.slug == "nightly-toa"
    assert schedule.parameters == shipped["parameters"]
    assert schedule.parameters["methods"][0] == "toa"
    assert deployment.work_pool_name == "toa-process"
    assert deployment.pull_steps[0]["prefect.deployments.steps.set_working_directory"]["directory"] == str(PROJECT)

    # enable and pause again with the commands the README documents
    sid = str(schedule.id)
    assert sid in prefect_cli(local_deployment, "deployment", "schedule", "ls", "toa/synthesize").stdout
    resumed = prefect_cli(local_deployment, "deployment", "schedule", "resume", "toa/synthesize", sid)
    assert resumed.returncode == 0, resumed.stderr
    assert read_deployment(local_deployment["api_url"]).schedules[0].active is True
    paused = prefect_cli(local_deployment, "deployment", "schedule", "pause", "toa/synthesize", sid)
    assert paused.returncode == 0, paused.stderr
    assert read_deployment(local_deployment["api_url"]).schedules[0].active is False
