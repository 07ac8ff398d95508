"""Model-server lifecycle tasks: launch (vLLM), attach (endpoint or block), stop.

A launched server's handle stays in this process (a Popen cannot travel as a task result);
the flow calls `stop_servers()` in a `finally`, so the process groups are stopped even when
the flow fails.
"""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from toa.config import AgentConfig
from toa.servers import Endpoint, ServerHandle, attach, start_vllm
from toa.servers.attach import probe

_RUNNING: list[ServerHandle] = []


@task(name="launch-server", cache_policy=NO_CACHE, task_run_name="launch-{agent.alias}")
def launch_server(agent: AgentConfig, log_dir: str) -> Endpoint:
    handle = start_vllm(agent.alias, agent.launch, Path(log_dir))
    _RUNNING.append(handle)
    return handle.endpoint


@task(name="attach-endpoint", cache_policy=NO_CACHE, task_run_name="attach-{agent.alias}")
def attach_endpoint(agent: AgentConfig) -> Endpoint:
    if agent.block:
        from toa.blocks.endpoints import ModelEndpoint

        endpoint = attach(agent.alias, ModelEndpoint.load(agent.block).attach_spec())
    else:
        endpoint = attach(agent.alias, agent.endpoint)
    probe(endpoint)  # unreachable or wrong key: a clear error now, not failed calls later
    return endpoint


def start_endpoints(agents: list[AgentConfig], log_dir: str) -> dict[str, Endpoint]:
    """Launch or attach every agent's server concurrently; {alias: Endpoint}."""
    futures = {
        a.alias: (launch_server.submit(a, log_dir) if a.launch else attach_endpoint.submit(a))
        for a in agents
    }
    return {alias: f.result() for alias, f in futures.items()}


def stop_servers() -> None:
    while _RUNNING:
        _RUNNING.pop().stop()
