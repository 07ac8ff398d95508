"""Runs one (method, batch) unit: the methods of a batch's prompts concurrently, every model
call through the request layer, every reward through the reward service, everything recorded.

Plain Python, no Prefect: tasks/sampling.py wraps `run_batch` in a Prefect task.

One process-wide `Engine` owns a background asyncio loop with the endpoint clients and one
reward service. Prefect runs tasks in worker threads; funnelling all of them into one loop is
what makes the per-endpoint in-flight limit hold for the whole process, loads the reward model
once, and micro-batches the reward requests of every method and batch running at once. Each
reward record is routed to the shard writer of the batch its prompt belongs to.

Resume: a batch reads its recorded calls and rewards first (`calls/batch=<key>`,
`rewards/batch=<key>`), so a rerun replays what was done and makes only the missing calls.
Calls and rewards are flushed to shards while the batch runs (every ~2 s; on a local root each
record is journaled at once, so a crash loses only the calls in flight); samples, tree nodes and a method's further tables (MethodOutput.tables, e.g.
value_targets) are written whole at the end, and a `done` marker, written
only when nothing failed, lets a rerun skip the batch entirely.

Cost and compute (sql/cost.sql): a unit prices the calls it made (BatchStats.cost, at the
agents' AgentConfig.price) and records how much each server's vLLM prefix cache was used while
it ran (a `prefix_cache` row: its counters read from /metrics at the start and the end).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import gc
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import polars as pl

from toa import stopping
from toa.calls import CallLayer, ClientPolicy, EndpointClient, new_limit
from toa.config import AgentConfig, RunConfig
from toa.limits import ensure_limits, names_for
from toa.methods import MethodContext
from toa.plan import RunPlan
from toa.reward import RewardService, build_backend
from toa.rows import (
    ERROR,
    OK,
    CallRecord,
    Generation,
    MethodOutput,
    PrefixCacheRow,
    Prompt,
    RewardRecord,
    Sample,
    Score,
    sample_row,
)
from toa.servers import Endpoint
from toa.servers.machine import likely_causes
from toa.servers.watch import Load, StallDetector, Verdict, watch
from toa.storage import ShardWriter, Store
from toa.units import (
    BatchStats,
    Counters,
    cache_growth,
    calls_cost,
    completed,
    mark_done,
)

log = logging.getLogger(__name__)


# Young passes of the cyclic garbage collector every 10 000 new objects (CPython's default: 700).
GC_THRESHOLDS = (10_000, 10, 10)
_gc_settled = False


def settle_gc() -> None:
    """Tune the cyclic garbage collector for a run, once per process. A run makes and drops
    dozens of objects per model call while it holds every finished one: at CPython's default
    thresholds the collector ran every few calls, and its older passes walked every object of
    the imported libraries too, about a third of the orchestrator's CPU per call
    (benchmarks/orchestrator.py). So what is alive when the first engine starts (modules,
    config) is moved out of the collector's sight (gc.freeze: it stays alive, as it would), and
    young passes run less often. Reference counting frees everything else at once, as before;
    only garbage in reference cycles waits for a pass."""
    global _gc_settled
    if _gc_settled:
        return
    _gc_settled = True
    gc.freeze()
    gc.set_threshold(*(max(now, ours) for now, ours in zip(gc.get_threshold(), GC_THRESHOLDS)))


class Engine:
    """A background event loop holding the endpoint clients and the reward backend."""

    def __init__(self, cfg: RunConfig, endpoints: dict[str, Endpoint]):
        settle_gc()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="toa-engine", daemon=True)
        self.thread.start()
        self.reward_backend = build_backend(cfg.reward)
        self.reward_cache: dict[str, RewardRecord] = {}  # records of the live batches' prompts
        self.reward_sinks: dict[str, list[ShardWriter]] = {}  # prompt_id -> writers of live batches
        self.reward_keys: dict[str, set[str]] = {}  # prompt_id -> its reward keys held in memory
        self.rewards = RewardService(self.reward_backend, self.reward_cache, self._route_reward,
                                     max_batch=cfg.reward.batch_size, max_wait_s=cfg.reward.max_wait_ms / 1000,
                                     retries=cfg.reward.retries)
        self.clients = self.run(make_clients(cfg.agents, endpoints))
        self.work: set[concurrent.futures.Future] = set()  # batches running on the loop
        self.watchers = self.run(self._start_watchers(cfg))
        self._forget_stop = stopping.on_stop(self.cancel_work)

    def run_work(self, coro):
        """`run` for a batch's work: cancelled (raising concurrent.futures.CancelledError in the
        caller) when the run is asked to stop."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        self.work.add(future)
        try:
            return future.result()
        finally:
            self.work.discard(future)

    def cancel_work(self) -> None:
        """Cancel every batch's work on the loop: model calls in flight are abandoned (not
        recorded), finished ones are already in the batch's call record."""
        for future in list(self.work):
            future.cancel()

    async def _start_watchers(self, cfg: RunConfig) -> list[asyncio.Task]:
        tasks = []
        for agent in cfg.agents:
            client = self.clients[agent.alias]
            if agent.stall_timeout_s is None and agent.min_tokens_per_s is None and client.adaptive is None:
                continue
            ep = client.endpoint
            detector = StallDetector(ep.alias, agent.stall_timeout_s, agent.min_tokens_per_s)
            url = ep.base_url.removesuffix("/v1") + "/metrics"
            tasks.append(asyncio.create_task(watch(url, ep.model, detector, functools.partial(_on_verdict, client),
                                                   api_key=ep.api_key.get_secret_value(),
                                                   poll_s=min(5.0, (agent.stall_timeout_s or 30) / 6),
                                                   on_load=_queue_feed(client))))
        return tasks

    def _route_reward(self, record: RewardRecord) -> None:
        sinks = self.reward_sinks.get(record.prompt_id)
        if not sinks:  # its batch was cancelled (a stop) and closed: a rerun scores it again
            return
        sinks[-1].append(record)
        self.reward_keys.setdefault(record.prompt_id, set()).add(record.reward_key)

    def open_batch(self, prompts: list[Prompt], cache: dict[str, RewardRecord], sink: ShardWriter) -> None:
        self.reward_cache.update(cache)
        for key, record in cache.items():
            self.reward_keys.setdefault(record.prompt_id, set()).add(key)
        for p in prompts:
            self.reward_sinks.setdefault(p.prompt_id, []).append(sink)

    def close_batch(self, prompts: list[Prompt], sink: ShardWriter) -> None:
        for p in prompts:
            writers = self.reward_sinks.get(p.prompt_id, [])
            if sink in writers:
                writers.remove(sink)
            if not writers:  # no live batch needs this prompt's rewards in memory any more
                self.reward_sinks.pop(p.prompt_id, None)
                keys = self.reward_keys.pop(p.prompt_id, set())
                for key in keys:
                    self.reward_cache.pop(key, None)
                self.rewards.forget(keys)

    def run(self, coro):
        """Run a coroutine on the engine loop from any thread and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def close(self) -> None:
        self._forget_stop()

        async def _close():
            for task in self.watchers:
                task.cancel()
            for c in self.clients.values():
                await c.aclose()
            aclose = getattr(self.reward_backend, "aclose", None)  # e.g. a launched reward server
            if aclose is not None:
                await aclose()
        self.run(_close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


def _on_verdict(client: EndpointClient, verdict: Verdict) -> None:
    """The watchdog's finding about one endpoint: a stall fails its calls, slowness is logged."""
    causes = likely_causes(client.endpoint)
    if verdict.kind == "stalled":
        log.error("%s; failing its calls. Likely causes: %s", verdict.message, causes)
        client.fail_in_flight(f"{verdict.message}. Likely causes: {causes}")
    else:
        log.warning("%s. Likely causes: %s", verdict.message, causes)


def _queue_feed(client: EndpointClient) -> Callable[[Load], None] | None:
    """The server's queue depth (vLLM requests waiting) to the client's adaptive limit (toa.aimd)."""
    if client.adaptive is None:
        return None
    limiter = client.adaptive
    return lambda load: limiter.queue_depth(load.waiting)


PromptHook = Callable[[str, str, int], None]


def _progress(hook: PromptHook | None, method: str, batch: str) -> Callable[[int], None]:
    """`hook` bound to one batch; a failing hook never fails the batch (progress is display)."""
    def report(done: int) -> None:
        if hook is not None:
            try:
                hook(method, batch, done)
            except Exception:
                pass
    return report


async def make_clients(agents: list[AgentConfig], endpoints: dict[str, Endpoint]) -> dict[str, EndpointClient]:
    """The request-layer clients of `agents`, by alias, with their local and cross-process limits
    (the Prefect limits are created first). Call on the loop that will use them.

    Agents that reach one endpoint (the same base URL and served model: one model under two
    system prompts or temperatures, say) share one in-flight limit, the smallest max_concurrency
    among them, adaptive if any of theirs is: it is the server's capacity. With a limit each,
    the server saw their sum, and one agent's idle slots could not serve the other's queue (TOA
    asks one agent more than the other; benchmarks/throughput.py (c))."""
    await ensure_limits(agents)
    policies = {agent.alias: _policy(agent) for agent in agents}

    def server(alias: str) -> tuple[str, str]:
        return endpoints[alias].base_url.rstrip("/"), endpoints[alias].model

    sharing: dict[tuple[str, str], list[ClientPolicy]] = {}
    for agent in agents:
        sharing.setdefault(server(agent.alias), []).append(policies[agent.alias])
    limits = {key: new_limit(ClientPolicy(min(p.max_concurrency for p in group), adaptive=any(p.adaptive for p in group)))
              for key, group in sharing.items()}
    return {agent.alias: EndpointClient(endpoints[agent.alias], agent.sampling.request_fields(), policies[agent.alias],
                                        limit=limits[server(agent.alias)])
            for agent in agents}


async def make_client(agent: AgentConfig, endpoint: Endpoint) -> EndpointClient:
    """One agent's client, with a limit of its own (see make_clients)."""
    return (await make_clients([agent], {agent.alias: endpoint}))[agent.alias]


def _policy(agent: AgentConfig) -> ClientPolicy:
    # adaptive by default where toa does not know the capacity: a server it did not launch
    adaptive = agent.adaptive_concurrency if agent.adaptive_concurrency is not None else agent.launch is None
    return ClientPolicy(agent.max_concurrency, agent.timeout_s, agent.retries, global_limits=names_for(agent.global_limit),
                        adaptive=adaptive)


# The engines of each owner (a flow run, see flows/synthesize.py) in this process: a run's stop
# or end touches only its own engines, never another run's in the same worker process.
_ENGINES: dict[str, dict[str, Engine]] = {}
_ENGINES_LOCK = threading.Lock()


def get_engine(cfg: RunConfig, endpoints: dict[str, Endpoint], owner: str = "") -> Engine:
    """`owner`'s engine for these endpoints and this config (created once per process)."""
    key = repr(sorted((a, e.base_url, e.identity) for a, e in endpoints.items())) + cfg.model_dump_json()
    with _ENGINES_LOCK:
        mine = _ENGINES.setdefault(owner, {})
        if key not in mine:  # a head start's engine, same config and endpoints, becomes the flow's
            ahead = _ENGINES.get(HEAD_START, {}).pop(key, None) if owner != HEAD_START else None
            mine[key] = ahead or Engine(cfg, endpoints)
        return mine[key]


def _engines_of(owner: str | None) -> list[Engine]:
    with _ENGINES_LOCK:
        return [e for o, engines in _ENGINES.items() if owner is None or o == owner for e in engines.values()]


def cancel_all_work(owner: str | None = None) -> None:
    """Cancel the running batches of `owner`'s engines (None: every engine in this process;
    see Engine.cancel_work)."""
    for engine in _engines_of(owner):
        engine.cancel_work()


def close_engines(owner: str | None = None) -> None:
    """Close `owner`'s engines (None: every engine in this process)."""
    engines = _engines_of(owner)
    with _ENGINES_LOCK:
        for o in [o for o in _ENGINES if owner is None or o == owner]:
            del _ENGINES[o]
    for engine in engines:
        engine.close()


# -- head start (toa/head_start.py) --------------------------------------------------------
# Units begun before the flow started: the flow's task for such a unit adopts it (run_batch).
HEAD_START = "head-start"  # owner of the head start's engine until a flow's get_engine takes it
_AHEAD: dict[tuple[str, str, str], concurrent.futures.Future] = {}


def start_ahead(plan: RunPlan, endpoints: dict[str, Endpoint], method: str, batch: str, prompts: list[Prompt]) -> None:
    """Run one unit now in a daemon thread (a Ctrl-C before the flow starts must not wait for
    it), on the HEAD_START engine; `run_batch` of the same unit later returns its result."""
    future: concurrent.futures.Future = concurrent.futures.Future()

    def work() -> None:
        try:
            future.set_result(run_batch(plan, endpoints, method, batch, prompts, HEAD_START))
        except BaseException as exc:  # handed to the adopting task, which raises it
            future.set_exception(exc)

    _AHEAD[(plan.run_id, method, batch)] = future
    threading.Thread(target=work, name="toa-head-start", daemon=True).start()


def started_ahead(run_id: str, method: str, batch: str) -> bool:
    """A head start holds this unit: it is still the flow's to run (and count), even if done."""
    return (run_id, method, batch) in _AHEAD


def end_head_start(timeout_s: float = 10.0) -> None:
    """After the flow: a head start it never adopted (it failed before sampling, or was
    stopped) is cancelled, its finished calls stay recorded, and its engine is closed."""
    cancel_all_work(HEAD_START)
    concurrent.futures.wait(list(_AHEAD.values()), timeout=timeout_s)
    _AHEAD.clear()
    close_engines(HEAD_START)


def calls_cache(store: Store, batch: str) -> dict[str, CallRecord]:
    """The recorded successful calls of a batch partition, by call key: what a rerun replays."""
    df = store.read("calls", f"batch={batch}").filter(pl.col("status") == OK)
    return {r["call_key"]: CallRecord(**r) for r in df.iter_rows(named=True)}


def _rewards_cache(store: Store, batch: str) -> dict[str, RewardRecord]:
    df = store.read("rewards", f"batch={batch}").filter(pl.col("status") == OK)
    return {r["reward_key"]: RewardRecord(**r) for r in df.iter_rows(named=True)}


def run_batch(plan: RunPlan, endpoints: dict[str, Endpoint], method: str, batch: str, prompts: list[Prompt],
              owner: str = "", on_prompt: PromptHook | None = None) -> BatchStats:
    """One (method, batch) unit; `on_prompt(method, batch, prompts done)` follows its progress
    (called on the engine loop, with 0 when the attempt starts; cheap, must not raise)."""
    cfg, run_id = plan.cfg, plan.run_id
    ahead = _AHEAD.pop((run_id, method, batch), None) if owner != HEAD_START else None
    if ahead is not None:  # this unit's head start (toa.head_start): its stats, or its error
        log.info("%s batch %s: began before the flow (head start); waiting for it", method, batch)
        return ahead.result()
    store = Store(cfg.results_root, cfg.storage_options)
    stopping.check(f"{method} batch {batch}")
    done = completed(store, run_id, method, batch)  # e.g. finished by another worker since it was planned
    if done is not None:
        return done
    engine = get_engine(cfg, endpoints, owner)
    start = time.perf_counter()
    caches_before, started_at = _read_prefix_caches(engine), time.time()
    call_sink = ShardWriter(store, "calls", f"batch={batch}")
    reward_sink = ShardWriter(store, "rewards", f"batch={batch}")
    engine.run(_on_loop(engine.open_batch, prompts, _rewards_cache(store, batch), reward_sink))
    replay = calls_cache(store, batch)
    try:
        outputs, layer = engine.run_work(_run_prompts(plan, engine, method, prompts, replay, call_sink,
                                                      _progress(on_prompt, method, batch)))
    except concurrent.futures.CancelledError:
        raise stopping.Stopped(f"{method} batch {batch}: stopped ({stopping.reason()}); "
                               "its finished calls are recorded and will be replayed") from None
    finally:
        engine.run(_on_loop(engine.close_batch, prompts, reward_sink))
        call_sink.flush()
        reward_sink.flush()
    stats = _write_outputs(store, run_id, method, batch, outputs)
    stats.calls_made, stats.calls_failed = sum(layer.made.values()), sum(layer.failed.values())
    stats.seconds = time.perf_counter() - start
    stats.worker = f"{socket.gethostname()}:{os.getpid()}"
    stats.cost, stats.currency = calls_cost([r for k, r in layer.cache.items() if k not in replay],
                                            {a.alias: a.price for a in cfg.agents if a.price is not None})
    _record_prefix_caches(store, (run_id, method, batch), caches_before, _read_prefix_caches(engine), started_at, stats.seconds)
    if not stats.failed:
        mark_done(store, run_id, stats)
    return stats


# -- prefix-cache use per unit (view prefix_cache, sql/cost.sql) ------------------------------
PREFIX_CACHE_READ_S = 2.0  # a reading of /metrics that takes longer is left out (null), not waited for


def _read_prefix_caches(engine: Engine) -> dict[str, tuple[str, Counters | None]]:
    """Each server's prefix-cache counters now, by metrics URL: (its agents, the counters or
    None). One reading per server, however many agents it serves. Never raises: a unit's work
    does not depend on it."""
    servers: dict[str, list[Endpoint]] = {}
    for client in engine.clients.values():
        servers.setdefault(client.endpoint.base_url.removesuffix("/v1") + "/metrics", []).append(client.endpoint)

    async def read_all():
        got = await asyncio.gather(*(_prefix_cache_counters(url, eps[0].api_key.get_secret_value()) for url, eps in servers.items()))
        return {url: (",".join(ep.alias for ep in eps), counters) for (url, eps), counters in zip(servers.items(), got)}
    try:
        return engine.run(read_all())
    except Exception as exc:  # e.g. the engine is closing
        log.info("prefix-cache counters not read: %s", exc)
        return {}


async def _prefix_cache_counters(url: str, api_key: str) -> Counters | None:
    """vLLM's prefix-cache counters (prompt tokens looked up, found) at `url`, summed over its
    engines; None when the page is missing, slow, or has no such counter (a hosted API)."""
    import httpx

    from toa.servers.watch import parse_metrics

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    try:
        async with httpx.AsyncClient(timeout=PREFIX_CACHE_READ_S, trust_env=False, headers=headers,
                                     verify=_tls_context()) as client:
            resp = await client.get(url)
    except httpx.HTTPError:
        return None
    if resp.status_code != 200 or "vllm:prefix_cache_queries" not in resp.text:
        return None
    load = parse_metrics(resp.text)
    return (load.cache_queries, load.cache_hits) if load is not None else None


@functools.cache
def _tls_context():
    """httpx's default TLS context, built once: building it is most of a reading's cost (22 ms
    of CPU on this project's 2-core Xeon, against 0.04 ms for a client given one)."""
    import httpx

    return httpx.create_ssl_context()


def _record_prefix_caches(store: Store, unit: tuple[str, str, str], before: dict, after: dict,
                          started_at: float, seconds: float) -> None:
    """One `prefix_cache` row per server for this unit attempt: what its counters grew by
    (null where a reading is missing). Nothing when no server publishes the counters."""
    if not any(c is not None for _, c in (*before.values(), *after.values())):
        return
    run_id, method, batch = unit
    rows = []
    for url, (agents, first) in before.items():
        queries, hits = cache_growth(first, after.get(url, (agents, None))[1])
        rows.append(PrefixCacheRow(run_id=run_id, method=method, batch=batch, agents=agents, queries=queries,
                                   hits=hits, started_at=started_at, seconds=seconds))
    try:  # one shard per attempt: a retry's reading adds to the first one's
        store.write_rows("prefix_cache", rows, f"run={run_id}", f"method={method}", f"{batch}-{int(started_at * 1000)}.parquet")
    except OSError as exc:
        log.warning("prefix-cache use of %s batch %s not recorded: %s", method, batch, exc)


async def _on_loop(fn, *args):
    """Run a plain function on the engine loop: the routing tables are only touched there."""
    return fn(*args)


async def _run_prompts(plan: RunPlan, engine, method_name, prompts, calls_cache, call_sink,
                       report: Callable[[int], None]):
    cfg = plan.cfg
    layer = CallLayer(engine.clients, calls_cache, call_sink.append, cfg.seed, namespace=method_name)
    method = plan.methods[method_name]
    agents = tuple(a.alias for a in cfg.agents)
    in_flight = asyncio.Semaphore(cfg.prompt_concurrency)

    async def one(prompt: Prompt) -> MethodOutput | BaseException:
        ctx = MethodContext(prompt=prompt, agents=agents, n=cfg.n, generate=layer.for_prompt(prompt.prompt_id),
                            reward=functools.partial(engine.rewards.score, prompt), seed=cfg.seed)
        async with in_flight:
            try:
                return await method.run(ctx)
            except Exception as exc:  # one prompt's failure is recorded, not the batch's end
                return exc
            finally:
                finished[0] += 1
                report(finished[0])

    finished = [0]
    report(0)
    outputs = await asyncio.gather(*(one(p) for p in prompts))
    return list(zip(prompts, outputs)), layer


def _write_outputs(store: Store, run_id: str, method: str, batch: str, outputs) -> BatchStats:
    stats = BatchStats(method=method, batch=batch, prompts=len(outputs))
    sample_rows: list[Any] = []  # rows.SampleRow
    table_rows: dict[str, list[Any]] = {}  # tree_nodes and MethodOutput.tables (e.g. value_targets), typed rows
    keys = {"run_id": run_id, "method": method, "batch": batch}
    for prompt, out in outputs:
        if isinstance(out, BaseException):
            stats.method_errors += 1
            sample_rows.append(_method_error_row(out, prompt, keys))
            continue
        for s in out.samples:
            sample_rows.append(sample_row(s, prompt_id=prompt.prompt_id, **keys))
            stats.cached += s.generation.cached
            stats.reward_errors += s.generation.ok and s.score.status == ERROR
            stats.prompt_tokens += s.generation.prompt_tokens
            stats.completion_tokens += s.generation.completion_tokens
        # the method's parts of its tables, completed with the keys it does not know
        for table, rows in out.table_rows(prompt_id=prompt.prompt_id, **keys).items():
            table_rows.setdefault(table, []).extend(rows)
    stats.samples = len(sample_rows) - stats.method_errors
    # Deterministic names: a retry overwrites the same shard instead of adding a second copy.
    store.write_rows("samples", sample_rows, f"run={run_id}", f"method={method}", f"{batch}.parquet")
    for table, rows in table_rows.items():
        if rows:
            store.write_rows(table, rows, f"run={run_id}", f"method={method}", f"{batch}.parquet")
    return stats


def _method_error_row(exc: BaseException, prompt: Prompt, keys: dict[str, str]):
    """The `samples` row (rows.SampleRow) that records a prompt whose method raised."""
    failed = Sample(Generation(sample_id=f"method-error:{prompt.prompt_id}", agent="", text=None, status=ERROR,
                               error=f"{type(exc).__name__}: {exc}"[:1000]), Score(None, ERROR, "method failed"),
                    action="method_error", order=-1)
    return sample_row(failed, prompt_id=prompt.prompt_id, **keys)
