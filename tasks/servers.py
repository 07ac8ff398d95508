"""Model-server lifecycle tasks: launch (vLLM), attach (endpoint or block), stop.

A launched server's handle stays in this process (a Popen cannot travel as a task result),
filed under its owner, the flow run that started it: the flow calls `stop_servers(owner)` in a
`finally`, so its process groups are stopped even when it fails or is asked to stop, and two
flow runs in one worker process never stop each other's servers.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from toa import stopping
from toa.config import AgentConfig, RunConfig
from toa.identity import Checked, verify_attached
from toa.servers import Endpoint, ServerHandle, attach, start_vllm
from toa.servers.attach import probe
from toa.servers.machine import cpu_info, likely_causes
from toa.storage import Store

_RUNNING: dict[str, list[ServerHandle]] = {}  # owner (flow run id) -> servers it launched
_RUNNING_LOCK = threading.Lock()
SLOW_PROBE_TOKENS_PER_S = 2.0  # one stream, prefill included: below this a run will crawl
STOP_TIMEOUT_S, STOPPING_TIMEOUT_S = 30.0, 5.0  # a stopping run has no requests left to drain


@task(name="launch-server", cache_policy=NO_CACHE, task_run_name="launch-{agent.alias}")
def launch_server(agent: AgentConfig, log_dir: str, owner: str) -> Endpoint:
    handle = start_vllm(agent.alias, agent.launch, Path(log_dir))
    with _RUNNING_LOCK:
        _RUNNING.setdefault(owner, []).append(handle)
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


def start_endpoints(cfg: RunConfig, owner: str, agents: list[AgentConfig] | None = None) -> dict[str, Endpoint]:
    """The endpoints of `agents` (default: the run's): attach every attached agent first (a
    wrong URL or key fails in a second, before any server is started for nothing) and check
    that the models behind them, and behind an attached reward model, are the ones their
    recorded calls came from (toa.identity.verify_attached: a changed one stops the run here,
    before any call is replayed), then launch the others concurrently, logging to the results
    root's logs/; {alias: Endpoint}."""
    agents = cfg.agents if agents is None else agents
    store = Store(cfg.results_root, cfg.storage_options)
    log_dir = store.local_dir("logs")
    attached = {a.alias: attach_endpoint.submit(a) for a in agents if not a.launch}
    endpoints = {alias: f.result() for alias, f in attached.items()}
    _log_identities(verify_attached(cfg, endpoints, run=owner, store=store))
    stopping.check("server start")
    launched = {a.alias: launch_server.submit(a, log_dir, owner) for a in agents if a.launch}
    for f in launched.values():  # all settled before any error is raised: none starts unseen
        f.wait()
    endpoints |= {alias: f.result() for alias, f in launched.items()}
    return {a.alias: endpoints[a.alias] for a in agents}


def _log_identities(checks: list[Checked]) -> None:
    logger = get_run_logger()
    for c in checks:
        if c.outcome == "unchecked":
            logger.warning("%s: could not check that the model is the one its recorded calls came from: %s; "
                           "going on (its failing calls are recorded as errors)", c.alias, c.note)
        elif c.outcome == "accepted":
            logger.warning("%s: the model at this endpoint changed (fingerprint %s, now %s); accepted by "
                           "accept_changed_models, its recorded calls are replayed; recorded under identity/",
                           c.alias, c.previous, c.fingerprint)
        else:
            logger.info("%s: behavioural fingerprint %s (%s)", c.alias, c.fingerprint,
                        "first seen, recorded" if c.outcome == "recorded" else "as recorded")


def stop_servers(owner: str) -> None:
    """Stop every server `owner` launched, all at once (each drains, then is killed)."""
    with _RUNNING_LOCK:
        handles = _RUNNING.pop(owner, [])
    timeout = STOPPING_TIMEOUT_S if stopping.requested() else STOP_TIMEOUT_S
    if handles:
        with ThreadPoolExecutor(len(handles)) as pool:
            list(pool.map(lambda h: h.stop(timeout), handles))
