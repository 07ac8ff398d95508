"""A watchdog on a running model server: catch a server that takes requests but does not
generate, and warn when it generates far slower than it should.

vLLM publishes Prometheus metrics at /metrics: requests running and waiting (gauges), prompt and
generation tokens (counters). A server that reports running requests while its token counters
stand still for `stall_after_s` is stalled (seen on a CPU without native bf16: 49 requests
running, 0.0 tokens/s for 12 minutes); the request layer then fails its calls with an error
row naming the server and what it reported, instead of waiting out every call's timeout and
retries. A server busy with several requests that generates under `min_tokens_per_s` gets one
warning naming the likely causes.

`StallDetector` is pure (fed timestamps and readings), `watch` is the async poller. Servers
without vLLM metrics (hosted APIs) are not watched: their calls keep their timeouts.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from dataclasses import dataclass

import httpx

SLOW_MIN_RUNNING = 4  # judge speed only with this many requests running (batching expected)
SLOW_WINDOW_S = 30.0

_SAMPLE = re.compile(r'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
_METRICS = {
    "vllm:num_requests_running": "running",
    "vllm:num_requests_waiting": "waiting",
    "vllm:generation_tokens_total": "generated",
    "vllm:prompt_tokens_total": "prompted",
    "vllm:prefix_cache_queries_total": "cache_queries",  # prompt tokens looked up in the prefix cache
    "vllm:prefix_cache_hits_total": "cache_hits",  # ... and found there
}


@dataclass(frozen=True)
class Load:
    """One reading of a server's metrics (summed over its engines)."""

    running: float = 0.0
    waiting: float = 0.0
    generated: float = 0.0  # generation tokens since the server started
    prompted: float = 0.0  # prompt tokens since the server started
    cache_queries: float = 0.0
    cache_hits: float = 0.0

    def describe(self) -> str:
        return (f"vllm:num_requests_running={self.running:g}, vllm:num_requests_waiting={self.waiting:g}, "
                f"vllm:generation_tokens_total={self.generated:g}, vllm:prompt_tokens_total={self.prompted:g}")


def parse_metrics(text: str, model: str | None = None) -> Load | None:
    """The vLLM load figures in a Prometheus text page (series of other models left out when a
    `model_name` label says so); None when the page has no vLLM metrics."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith("vllm:"):
            continue
        m = _SAMPLE.match(line)
        if m is None or m["name"] not in _METRICS:
            continue
        labels = dict(_LABEL.findall(m["labels"] or ""))
        if model is not None and labels.get("model_name", model) != model:
            continue
        try:
            value = float(m["value"])
        except ValueError:
            continue
        key = _METRICS[m["name"]]
        values[key] = values.get(key, 0.0) + value
    return Load(**values) if values else None


@dataclass(frozen=True)
class Verdict:
    kind: str  # "stalled" or "slow"
    message: str


class StallDetector:
    """Decides from successive readings whether a server is stalled or slow.

    Progress is any growth of the token counters (prefill counts: a long prompt is work too).
    Idle (nothing running) is never a stall. "slow" is said once per detector."""

    def __init__(self, name: str, stall_after_s: float | None, min_tokens_per_s: float | None,
                 slow_window_s: float = SLOW_WINDOW_S):
        self.name, self.stall_after_s, self.min_tokens_per_s = name, stall_after_s, min_tokens_per_s
        self.slow_window_s = slow_window_s
        self.last: Load | None = None
        self.progress_at: float | None = None  # last time tokens moved or nothing ran
        self.window: tuple[float, float] | None = None  # (start time, generated then) while busy
        self.warned_slow = False

    def observe(self, now: float, load: Load) -> Verdict | None:
        moved = self.last is None or (load.generated, load.prompted) != (self.last.generated, self.last.prompted)
        if moved or load.running <= 0 or self.progress_at is None:
            self.progress_at = now
        self.last = load
        stalled_for = now - self.progress_at
        if self.stall_after_s is not None and load.running > 0 and stalled_for >= self.stall_after_s:
            return Verdict("stalled", (
                f"server {self.name!r} stalled: {load.running:g} requests running, {load.waiting:g} waiting, "
                f"no token generated in {stalled_for:.0f} s ({load.describe()})"))
        return self._speed(now, load)

    def _speed(self, now: float, load: Load) -> Verdict | None:
        if self.min_tokens_per_s is None or self.warned_slow or load.running < SLOW_MIN_RUNNING:
            self.window = None
            return None
        if self.window is None:
            self.window = (now, load.generated)
            return None
        start, generated = self.window
        if now - start < self.slow_window_s:
            return None
        rate = (load.generated - generated) / (now - start)
        self.window = (now, load.generated)
        if rate >= self.min_tokens_per_s:
            return None
        self.warned_slow = True
        return Verdict("slow", (
            f"server {self.name!r} generates {rate:.1f} tokens/s with {load.running:g} requests running "
            f"(floor {self.min_tokens_per_s:g} tokens/s)"))


async def read_load(client: httpx.AsyncClient, url: str, model: str | None) -> Load | None:
    try:
        resp = await client.get(url)
    except httpx.HTTPError:
        return None
    return parse_metrics(resp.text, model) if resp.status_code == 200 else None


async def watch(metrics_url: str, model: str | None, detector: StallDetector,
                on_verdict: Callable[[Verdict], None], api_key: str | None = None,
                poll_s: float = 5.0, clock: Callable[[], float] | None = None,
                on_load: Callable[[Load], None] | None = None) -> bool:
    """Poll `metrics_url` until cancelled, passing every verdict to `on_verdict` and every
    reading to `on_load` (e.g. the queue depth to an adaptive limit, toa.aimd); a stall ends
    the watch. Returns False at once when the server has no vLLM metrics (nothing to watch)."""
    clock = clock or asyncio.get_running_loop().time
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    async with httpx.AsyncClient(timeout=poll_s, trust_env=False, headers=headers) as client:
        if await read_load(client, metrics_url, model) is None:
            return False
        while True:
            load = await read_load(client, metrics_url, model)
            if load is not None:
                if on_load is not None:
                    on_load(load)
                verdict = detector.observe(clock(), load)
                if verdict is not None:
                    on_verdict(verdict)
                    if verdict.kind == "stalled":
                        return True
            await asyncio.sleep(poll_s)
