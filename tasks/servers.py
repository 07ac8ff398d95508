"""Model-server lifecycle tasks: launch (vLLM), attach (endpoint or block), stop.

A launched server's handle stays in this process (a Popen cannot travel as a task result);
the flow calls `stop_servers()` in a `finally`, so the process groups are stopped even when
the flow fails or is asked to stop.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from toa import stopping
from toa.config import AgentConfig
from toa.servers import Endpoint, ServerHandle, attach, start_vllm
from toa.servers.attach import probe
from toa.servers.machine import cpu_info, likely_causes

_RUNNING: list[ServerHandle] = []
SLOW_PROBE_TOKENS_PER_S = 2.0  # one stream, prefill included: below this a run will crawl
STOP_TIMEOUT_S, STOPPING_TIMEOUT_S = 30.0, 5.0  # a stopping run has no requests left to drain


@task(name="launch-server", cache_policy=NO_CACHE, task_run_name="launch-{agent.alias}")
def launch_server(agent: AgentConfig, log_dir: str) -> Endpoint:
    handle = start_vllm(agent.alias, agent.launch, Path(log_dir))
    _RUNNING.append(handle)
    ep, logger = handle.endpoint, get_run_logger()
    logger.info("%s: vLLM on %s, dtype %s%s, %s; first generation %.1f tokens/s (one stream)", agent.alias,
                ep.device, ep.dtype, _dtype_why(agent), _cores(ep), handle.tokens_per_s or 0.0)
    if handle.tokens_per_s is not None and handle.tokens_per_s < SLOW_PROBE_TOKENS_PER_S:
        logger.warning("%s generated its first tokens at %.1f tokens/s: this run will be slow. Likely causes: %s",
                       agent.alias, handle.tokens_per_s, likely_causes(ep))
    return ep


def _dtype_why(agent: AgentConfig) -> str:
    if agent.launch.dtype != "auto":
        return " (as configured)"
    if agent.launch.resolved_device() != "cpu":
        return " (auto: the model's)"
    info = cpu_info()
    return f" (auto: {'native' if info.native_bf16 else 'no native'} bf16 on {info.model})"


def _cores(ep: Endpoint) -> str:
    if ep.device != "cpu":
        return "GPU"
    return f"cores {','.join(map(str, ep.cpus))}" if ep.cpus else "cores unbound"


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
    """Attach every attached agent first (a wrong URL or key fails in a second, before any
    server is started for nothing), then launch the others concurrently; {alias: Endpoint}."""
    attached = {a.alias: attach_endpoint.submit(a) for a in agents if not a.launch}
    endpoints = {alias: f.result() for alias, f in attached.items()}
    stopping.check("server start")
    launched = {a.alias: launch_server.submit(a, log_dir) for a in agents if a.launch}
    for f in launched.values():  # all settled before any error is raised: none starts unseen
        f.wait()
    endpoints |= {alias: f.result() for alias, f in launched.items()}
    return {a.alias: endpoints[a.alias] for a in agents}


def stop_servers() -> None:
    """Stop every server this process launched, all at once (each drains, then is killed)."""
    handles, _RUNNING[:] = list(_RUNNING), []
    timeout = STOPPING_TIMEOUT_S if stopping.requested() else STOP_TIMEOUT_S
    if handles:
        with ThreadPoolExecutor(len(handles)) as pool:
            list(pool.map(lambda h: h.stop(timeout), handles))
