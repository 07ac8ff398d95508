"""Shared fixtures. `prefect_api` gives integration tests a real (temporary, local) Prefect API."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def prefect_api():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def embedded_servers(tmp_path_factory):
    """Both embedded models served by real vLLM CPU servers, started once (concurrently) for
    the tests that attach to running endpoints: {alias: Endpoint}."""
    from concurrent.futures import ThreadPoolExecutor

    from toa.servers import LaunchSpec, start_vllm
    from toa.servers.spec import place_cpu_servers

    log_dir = tmp_path_factory.mktemp("server-logs")
    models = {"smollm2": "embedded:smollm2-135m-instruct", "gemma3": "embedded:gemma3-270m"}
    specs = place_cpu_servers({a: LaunchSpec(model=m) for a, m in models.items()})  # as a run places them
    with ThreadPoolExecutor(len(models)) as pool:
        futures = {a: pool.submit(start_vllm, a, spec, log_dir) for a, spec in specs.items()}
    handles = {a: f.result() for a, f in futures.items() if f.exception() is None}
    try:
        failed = [f.exception() for f in futures.values() if f.exception() is not None]
        if failed:
            raise failed[0]  # the other server is stopped below, not left running
        yield {a: h.endpoint for a, h in handles.items()}
    finally:
        for h in handles.values():
            h.stop()


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
    import json

    root = tmp_path / "results"
    run_file = tmp_path / "run.toml"
    run_file.write_text("\n".join([
        f"results_root = {json.dumps(str(root))}", 'methods = ["random"]', "n = 1", "[prompts]", "limit = 2",
        "[[agents]]", f'alias = "{alias}"', "[agents.launch]", 'model = "embedded:smollm2-135m-instruct"',
        "[agents.sampling]", "max_tokens = 16"]) + "\n")
    return run_file, root


@pytest.fixture(scope="session")
def local_deployment(tmp_path_factory):
    """The deployment path of deployments/local.sh for real: a Prefect server (own PREFECT_HOME,
    free port), the process pool, toa's block types, the `synthesize` deployment and a worker
    running this venv's python. Yields {"env": ..., "api_url": ...}; `local.sh down` at the end."""
    import subprocess
    import sys
    from pathlib import Path

    from toa.servers.vllm import free_port

    script = Path(__file__).resolve().parents[1] / "deployments" / "local.sh"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(TOA_DEPLOY_DIR=str(tmp_path_factory.mktemp("deploy")), TOA_PREFECT_PORT=str(free_port()),
               TOA_VENV=sys.prefix, PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1")
    env.update(PREFECT_API_URL=f"http://127.0.0.1:{env['TOA_PREFECT_PORT']}/api",
               PREFECT_HOME=str(Path(env["TOA_DEPLOY_DIR"]) / "prefect-home"))
    try:
        up = subprocess.run(["bash", str(script), "up"], env=env, capture_output=True, text=True, timeout=600)
        assert up.returncode == 0, f"local.sh up failed:\n{up.stdout[-3000:]}\n{up.stderr[-3000:]}"
        yield {"env": env, "api_url": env["PREFECT_API_URL"], "script": script}
    finally:
        subprocess.run(["bash", str(script), "down"], env=env, capture_output=True, timeout=120)


def prefect_at(api_url: str):
    """Settings context that points this process's Prefect client at `api_url`."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    return temporary_settings({PREFECT_API_URL: api_url})
