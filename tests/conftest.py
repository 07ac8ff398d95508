"""Shared fixtures. `prefect_api` gives integration tests a real (temporary, local) Prefect API.

Plain helpers that test modules import live in helpers.py (and fakes.py), never here: test
modules do not import conftest or each other."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Fixtures that start real servers (vLLM CPU, a Prefect API or a deployment). A test that uses one
# (directly or through another fixture) must be marked `integration`, so that
# `pytest -m "not integration"` stays fast; an unmarked one fails here, before any server starts.
INTEGRATION_FIXTURES = frozenset({"prefect_api", "embedded_servers", "local_deployment",
                                  "vllm_python", "smollm2_server", "gemma_server"})  # last 3: test_servers.py


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    used = INTEGRATION_FIXTURES.intersection(getattr(item, "fixturenames", ()))
    if used and item.get_closest_marker("integration") is None:
        pytest.fail(f"{item.nodeid} uses {sorted(used)} (starts real servers) but is not marked "
                    "@pytest.mark.integration; mark it (or its module: pytestmark = pytest.mark.integration)",
                    pytrace=False)


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
