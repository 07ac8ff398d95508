"""Adaptive concurrency (toa.aimd): the AIMD controller on its own, the limiter whose capacity
changes at run time, and the acceptance test of the request layer against `CappedOpenAIDouble`,
a real HTTP server (in a thread of this process) that answers 429 above N requests in flight."""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from pydantic import SecretStr

from toa.aimd import AdaptiveLimiter, AimdController
from toa.calls import CallLayer, ClientPolicy, EndpointClient
from toa.config import AgentConfig
from toa.engine import _queue_feed, make_client, make_clients
from toa.rows import OK
from toa.servers import Endpoint
from toa.servers.watch import Load, StallDetector, watch


# -- the controller ---------------------------------------------------------------------------
def test_starts_at_the_start_value_under_the_ceiling():
    assert AimdController(64, start=8).limit == 8
    assert AimdController(4, start=8).limit == 4
    assert AimdController(64, start=0).limit == 1


def test_slow_start_then_one_step_per_window_of_successes():
    c = AimdController(64, start=8)
    for _ in range(4):  # slow start: +1 per success until the first overload
        c.on_success(c.epoch)
    assert c.limit == 12
    assert c.on_overload(c.epoch) and c.limit == 6
    grew = [c.on_success(c.epoch) for _ in range(6 + 7)]  # a window of 6, then one of 7
    assert grew == [False] * 5 + [True] + [False] * 6 + [True] and c.limit == 8


def test_one_burst_of_overloads_halves_once():
    c = AimdController(64, start=32, slow_start=False)
    sent = c.epoch  # 32 requests went out under the limit of 32 ...
    fell = [c.on_overload(sent) for _ in range(32)]  # ... and all came back 429
    assert fell == [True] + [False] * 31 and c.limit == 16
    assert c.on_overload(c.epoch) and c.limit == 8  # a request sent after the decrease counts again


def test_successes_of_requests_sent_before_a_decrease_do_not_count():
    c = AimdController(64, start=4, slow_start=False)
    old = c.epoch
    c.on_overload(old)
    assert c.limit == 2
    assert not any(c.on_success(old) for _ in range(10)) and c.limit == 2
    assert [c.on_success(c.epoch) for _ in range(2)] == [False, True] and c.limit == 3


def test_floor_and_ceiling():
    c = AimdController(3, start=3)
    assert not any(c.on_success(c.epoch) for _ in range(20)) and c.limit == 3  # never above the ceiling
    for _ in range(5):
        c.on_overload(c.epoch)
    assert c.limit == 1  # never below 1, however many decreases


def test_unsaturated_successes_do_not_grow_the_limit():
    c = AimdController(64, start=8)
    assert not any(c.on_success(c.epoch, saturated=False) for _ in range(100)) and c.limit == 8


def test_decrease_factor_is_configurable():
    c = AimdController(64, start=40, decrease=0.75)
    c.on_overload(c.epoch)
    assert c.limit == 30


def test_queue_depth_above_the_threshold_halves_once_per_drained_window():
    c = AimdController(64, start=32, queue_threshold=8)
    assert not c.on_queue_depth(8) and c.limit == 32  # at the threshold: fine
    assert c.on_queue_depth(9) and c.limit == 16
    assert not c.on_queue_depth(50) and c.limit == 16  # the old 32 in flight have not drained yet
    for _ in range(15):
        c.on_success(c.epoch - 1)  # old requests finishing
    assert not c.on_queue_depth(50)
    c.on_success(c.epoch - 1)  # the 16th: in flight is down to the new limit
    assert c.on_queue_depth(50) and c.limit == 8
    assert not AimdController(64, queue_threshold=None).on_queue_depth(1e9)


# -- the limiter ------------------------------------------------------------------------------
class CheckedLimiter(AdaptiveLimiter):
    """The real limiter, noting every admission that took in_flight above the limit of that moment
    (a limit that falls below the requests already in flight is not such an admission)."""

    __slots__ = ("_count", "over")

    def __init__(self, controller: AimdController):
        self._count, self.over = 0, []
        super().__init__(controller)

    @property
    def in_flight(self) -> int:
        return self._count

    @in_flight.setter
    def in_flight(self, value: int) -> None:
        if value > self._count and value > self.controller.limit:
            self.over.append((value, self.controller.limit))
        self._count = value


async def test_limiter_never_admits_more_than_the_current_limit():
    rng = random.Random(0)
    limiter = CheckedLimiter(AimdController(16, start=6, slow_start=False))

    async def one(i: int) -> None:
        async with limiter:
            for _ in range(rng.randrange(1, 4)):
                await asyncio.sleep(0)  # let the others run while this one is in flight
            if i == 20:
                limiter.overloaded(limiter.epoch)  # 6 -> 3 while 6 are in flight
            elif i == 60:
                limiter.controller.limit = 10  # grown by hand; the next release admits up to it
            else:
                limiter.succeeded(limiter.epoch)

    peaks: list[int] = []

    async def sample() -> None:
        while True:
            peaks.append(limiter.in_flight)
            await asyncio.sleep(0)

    sampler = asyncio.create_task(sample())
    await asyncio.gather(*(one(i) for i in range(120)))
    sampler.cancel()
    assert limiter.over == []  # nobody got in while in_flight >= limit
    assert limiter.controller.epoch == 1 and limiter.controller.limit > 10  # it fell, then grew again
    assert limiter.in_flight == 0 and 10 < max(peaks) <= limiter.controller.limit


async def test_a_growing_limit_wakes_waiters_without_a_release():
    limiter = AdaptiveLimiter(AimdController(8, start=1))
    await limiter.acquire()
    admitted: list[int] = []

    async def wait(i: int) -> None:
        await limiter.acquire()
        admitted.append(i)

    waiters = [asyncio.create_task(wait(i)) for i in range(3)]
    await asyncio.sleep(0)
    assert admitted == [] and limiter.in_flight == 1
    limiter.succeeded(limiter.epoch)  # slow start: 1 -> 2 while the first still holds its slot
    await asyncio.sleep(0)
    assert admitted == [0] and limiter.in_flight == 2  # first come, first served
    limiter.release()
    limiter.release()
    await asyncio.gather(*waiters)
    assert admitted == [0, 1, 2]


async def test_a_cancelled_waiter_leaves_no_slot_taken():
    limiter = AdaptiveLimiter(AimdController(4, start=1))
    await limiter.acquire()
    waiting = asyncio.create_task(limiter.acquire())
    await asyncio.sleep(0)
    limiter.release()  # hands the slot to the waiter ...
    waiting.cancel()  # ... which is cancelled before it runs: the slot comes back
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert limiter.in_flight == 0
    await limiter.acquire()
    queued = asyncio.create_task(limiter.acquire())
    await asyncio.sleep(0)
    queued.cancel()  # cancelled while still waiting: it leaves the queue
    with pytest.raises(asyncio.CancelledError):
        await queued
    assert limiter.in_flight == 1 and not limiter._waiters


# -- the request layer against a server that refuses more than N at once -----------------------
class _Server(ThreadingHTTPServer):
    request_queue_size = 128  # the default backlog of 5 delays a burst of connections by a SYN retry (1 s)
    daemon_threads = True


class CappedOpenAIDouble:
    """A test double of an OpenAI chat server that serves at most `cap` requests at once: each
    is held `hold_s` (its generation time), one beyond the cap is answered 429 at once. Its
    /metrics page reports `waiting` as vllm:num_requests_waiting."""

    def __init__(self, cap: int, hold_s: float, waiting: float = 0.0):
        self.cap, self.hold_s, self.waiting = cap, hold_s, waiting
        self.lock = threading.Lock()
        self.in_flight = self.max_in_flight = self.served = self.rejected = 0
        self.server = _Server(("127.0.0.1", 0), _handler(self))
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _handler(double: CappedOpenAIDouble):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:
            pass

        def _send(self, status: int, data: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            self._send(200, f'vllm:num_requests_running{{model_name="m"}} 1.0\n'
                            f'vllm:num_requests_waiting{{model_name="m"}} {double.waiting}\n'.encode())

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))  # consumed; every request is served alike
            with double.lock:
                double.in_flight += 1
                refused = double.in_flight > double.cap
                if refused:
                    double.in_flight -= 1
                    double.rejected += 1
                else:
                    double.max_in_flight = max(double.max_in_flight, double.in_flight)
            if refused:
                self._send(429, b'{"error": {"message": "too many requests in flight"}}')
                return
            time.sleep(double.hold_s)  # the generation
            with double.lock:  # out of flight before the answer leaves, so the client never overlaps it
                double.in_flight -= 1
                double.served += 1
            self._send(200, json.dumps({"choices": [{"index": 0, "finish_reason": "stop",
                                                     "message": {"role": "assistant", "content": "ok"}}],
                                        "usage": {"prompt_tokens": 3, "completion_tokens": 1}}).encode())

    return Handler


def _endpoint(base: str) -> Endpoint:
    return Endpoint(alias="a", base_url=f"{base}/v1", model="m", api_key=SecretStr(""), identity="capped")


async def _run_calls(client: EndpointClient, calls: int) -> tuple[list, list[int]]:
    records: list = []
    layer = CallLayer({"a": client}, {}, records.append, run_seed=0)
    limits: list[int] = []

    async def one(i: int) -> None:
        await layer.for_prompt(f"p{i}")("a", [{"role": "user", "content": f"question {i}"}], 1)
        limits.append(client.limit.limit if client.adaptive else client.policy.max_concurrency)

    await asyncio.gather(*(one(i) for i in range(calls)))
    return records, limits


async def test_adaptive_limit_settles_near_the_servers_capacity_with_no_error_rows():
    random.seed(0)  # the backoff jitter
    cap, calls = 8, 400
    double = CappedOpenAIDouble(cap=cap, hold_s=0.02)
    client = EndpointClient(_endpoint(double.base), {"max_tokens": 1},
                            ClientPolicy(max_concurrency=64, retries=6, backoff_s=0.02, adaptive=True))
    try:
        records, limits = await _run_calls(client, calls)
    finally:
        await client.aclose()
        double.close()
    second_half = limits[calls // 2:]
    mean = sum(second_half) / len(second_half)
    print(f"\nsettle: cap {cap}, {calls} calls, {client.requests} requests, {double.rejected} answered 429, "
          f"server saw at most {double.max_in_flight} in flight; limit over the second half: mean {mean:.1f}, "
          f"min {min(second_half)}, max {max(second_half)}; {client.adaptive.controller.epoch} decreases")
    assert len(records) == calls and all(r.status == OK for r in records)  # no error rows
    assert cap / 2 <= mean <= 2 * cap
    assert double.served == calls and client.requests == calls + double.rejected
    assert double.rejected <= calls // 8  # each 429 halves the limit, so few follow


class ScriptedFakeTransport:
    """In-process fake transport: answers the statuses of `script` in order ("hang": never answers)."""

    def __init__(self, script):
        self.script = list(script)

    async def __call__(self, url: str, body: bytes) -> tuple[int, bytes]:
        status = self.script.pop(0)
        if status == "hang":
            await asyncio.get_running_loop().create_future()
        return status, b'{"choices": [{"index": 0, "message": {"content": "ok"}}], "usage": {}}'


async def test_429_503_and_timeouts_lower_the_limit_other_errors_do_not():
    fake = ScriptedFakeTransport([429, 503, 500, "hang", 200])
    client = EndpointClient(_endpoint("http://fake"), {}, ClientPolicy(max_concurrency=64, retries=4, backoff_s=0.001,
                                                                       timeout_s=0.05, adaptive=True, adaptive_start=32),
                            transport=fake)
    choices = await client.complete([{"role": "user", "content": "hi"}], 1, seed=0)
    assert choices[0].text == "ok" and client.requests == 5  # every failure retried, each through the limiter
    # 429 -> 16, 503 -> 8, 500 (a server bug, not load) -> 8, timeout -> 4; the lone success
    # (1 in flight of 4 allowed: the limit was not tested) leaves it there
    assert client.adaptive.controller.epoch == 3 and client.limit.limit == 4 and client.limit.in_flight == 0


async def test_fixed_limit_when_adaptive_is_off():
    cap = 8
    double = CappedOpenAIDouble(cap=cap, hold_s=0.02)
    client = EndpointClient(_endpoint(double.base), {"max_tokens": 1},
                            ClientPolicy(max_concurrency=4, retries=2, backoff_s=0.01))
    try:
        records, limits = await _run_calls(client, 40)
    finally:
        await client.aclose()
        double.close()
    assert client.adaptive is None and isinstance(client.limit, asyncio.Semaphore)
    assert all(r.status == OK for r in records) and double.rejected == 0
    assert double.max_in_flight == 4 and set(limits) == {4}  # today's fixed semaphore: all of it, no more


async def test_make_client_turns_adaptive_on_for_attached_endpoints_only():
    ep = _endpoint("http://127.0.0.1:9")
    attached = {"alias": "a", "endpoint": {"base_url": "http://127.0.0.1:9/v1", "model": "m"}}
    launched = {"alias": "a", "launch": {"model": "embedded:smollm2-135m-instruct"}}
    assert (await make_client(AgentConfig(**attached), ep)).adaptive is not None
    assert (await make_client(AgentConfig(**launched), ep)).adaptive is None
    assert (await make_client(AgentConfig(**attached, adaptive_concurrency=False), ep)).adaptive is None
    forced = await make_client(AgentConfig(**launched, adaptive_concurrency=True, max_concurrency=4), ep)
    assert forced.adaptive is not None and forced.adaptive.controller.ceiling == 4 and forced.limit.limit == 4


async def test_agents_of_one_endpoint_share_its_limit():
    """Two aliases of one server (same base URL and model): the server sees at most the smaller
    max_concurrency in flight, not the sum; another model on the same URL keeps its own limit."""
    double = CappedOpenAIDouble(cap=100, hold_s=0.02)
    endpoint = {"base_url": f"{double.base}/v1", "model": "m"}
    agents = [AgentConfig(alias="a", endpoint=endpoint, max_concurrency=4, adaptive_concurrency=False),
              AgentConfig(alias="b", endpoint=endpoint, max_concurrency=3, adaptive_concurrency=False,
                          sampling={"temperature": 0.5}),  # else a's requests, answered once
              AgentConfig(alias="c", endpoint={**endpoint, "model": "other"}, max_concurrency=2, adaptive_concurrency=False)]
    endpoints = {a.alias: Endpoint(alias=a.alias, base_url=a.endpoint.base_url, model=a.endpoint.model,
                                   api_key=SecretStr(""), identity=a.endpoint.model) for a in agents}
    clients = await make_clients(agents, endpoints)
    assert clients["a"].limit is clients["b"].limit and clients["c"].limit is not clients["a"].limit
    layer = CallLayer(clients, {}, lambda record: None, run_seed=0)
    try:
        await asyncio.gather(*(layer.for_prompt(f"p{i}")(alias, [{"role": "user", "content": f"q{i}"}], 1)
                               for i in range(24) for alias in ("a", "b")))
        assert double.served == 48 and double.max_in_flight == 3  # the smaller limit, for both
        double.max_in_flight = 0
        await asyncio.gather(*(layer.for_prompt(f"p{i}")(alias, [{"role": "user", "content": f"r{i}"}], 1)
                               for i in range(24) for alias in ("a", "c")))
        assert double.max_in_flight == 5  # a's share of the shared 3, c's own 2
    finally:
        for client in clients.values():
            await client.aclose()
        double.close()


class _Enough(Exception):
    """Ends the watch once it has fed a reading."""


async def test_the_metrics_watch_feeds_the_queue_depth_to_the_adaptive_limit():
    double = CappedOpenAIDouble(cap=8, hold_s=0.0, waiting=40)
    client = EndpointClient(_endpoint(double.base), {}, ClientPolicy(max_concurrency=64, adaptive=True, adaptive_start=32))
    feed = _queue_feed(client)
    fed: list[Load] = []

    def on_load(load: Load) -> None:
        feed(load)
        fed.append(load)
        raise _Enough

    try:
        with pytest.raises(_Enough):
            await watch(f"{double.base}/metrics", "m", StallDetector("a", None, None), fed.append,
                        on_load=on_load)  # ends at the first reading, before any poll wait
    finally:
        double.close()
    assert fed[0].waiting == 40 and client.limit.limit == 16  # 40 waiting > 8: halved
    fixed = EndpointClient(_endpoint(double.base), {}, ClientPolicy())
    assert _queue_feed(fixed) is None
