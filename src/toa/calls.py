"""The request layer: every model call goes through here, recorded once under a content key.

One HTTP transport per endpoint (aiohttp: see HttpTransport for why not the OpenAI SDK), a
per-endpoint limit on requests in flight (and, when
configured, Prefect global limits that hold across processes: toa.limits), a timeout,
and retries with exponential backoff on transient failures only (connection errors, timeouts,
429 and 5xx); a 4xx such as a prompt longer than the context fails at once.

The cache key of a sample slot is sha256(method, model identity, messages, sampling parameters,
run seed, slot), where slot counts how often this prompt has asked this agent these exact
messages. Asking again therefore yields the next slot, and a rerun of the same method asks for
the same slots in the same order, so it is served from the record and makes zero model calls.
The method is part of the key so that each method pays for (and owns) its own budget: methods
running at once never race for a shared sample.

Several slots are requested in one call with `n=k` where the endpoint supports it (vLLM shares
the prompt prefill). Token logprobs are asked for only when a method asks (`logprobs=True`:
Optima's utterance loss, step-MCTS priors): they cost the server time (4–14 % on SmolLM2 with
vLLM CPU, benchmarks/throughput.py) and bytes on every response. Per-choice completion tokens are then exact; without them the
request's total is split over its choices in proportion to their text length.
A failed call is recorded with status "error" and its message and is retried on the next run.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import aiohttp
import orjson

from toa.aimd import START, AdaptiveLimiter, AimdController
from toa.limits import LimitNames, request_slot
from toa.rows import ERROR, OK, CallRecord, Generation, Message, content_key
from toa.servers import Endpoint


# -- errors: named as the OpenAI SDK names them, so a recorded message reads the same whichever
# client made the call ("BadRequestError 400: ...", "APIConnectionError: ...").
class APIError(Exception):
    status_code: int | None = None


class APIConnectionError(APIError):
    """The server could not be reached, or dropped the connection (transient)."""


class APITimeoutError(APIConnectionError):
    """No answer within the agent's timeout_s (transient)."""


class APIStatusError(APIError):
    def __init__(self, status: int, body: bytes):
        self.status_code = status
        super().__init__(f"Error code: {status} - {body.decode(errors='replace')[:1000]}")


class BadRequestError(APIStatusError): ...
class AuthenticationError(APIStatusError): ...
class PermissionDeniedError(APIStatusError): ...
class NotFoundError(APIStatusError): ...
class RateLimitError(APIStatusError): ...
class InternalServerError(APIStatusError): ...


_BY_STATUS = {400: BadRequestError, 401: AuthenticationError, 403: PermissionDeniedError, 404: NotFoundError,
              429: RateLimitError}
TRANSIENT = (APIConnectionError, RateLimitError, InternalServerError)


def status_error(status: int, body: bytes) -> APIStatusError:
    cls = _BY_STATUS.get(status, InternalServerError if status >= 500 else APIStatusError)
    return cls(status, body)


class ServerStalled(RuntimeError):
    """The endpoint's watchdog (toa.servers.watch) saw it take requests without generating;
    every call to it fails at once with what it reported, for the rest of the run."""


@dataclass(frozen=True)
class ClientPolicy:
    max_concurrency: int = 64
    timeout_s: float = 300.0
    retries: int = 4
    backoff_s: float = 0.5  # first retry waits ~0.5 s, then 1, 2, 4 ... (capped) with jitter
    backoff_cap_s: float = 20.0
    global_limits: LimitNames | None = None  # Prefect limits shared across processes (toa.limits)
    adaptive: bool = False  # AIMD of the requests in flight, max_concurrency the ceiling (toa.aimd)
    adaptive_start: int = START  # the adaptive limit's first value (at most max_concurrency)


@dataclass(frozen=True)
class _Choice:
    text: str | None
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    logprob: float | None = None
    server_s: float | None = None  # the request's server-side time, where the reply carries it
    request_choices: int = 1  # choices of the request that returned this one


# POST (url, JSON body) -> (HTTP status, response body). The default is HttpTransport; unit tests
# pass an in-process fake.
Transport = Callable[[str, bytes], Awaitable[tuple[int, bytes]]]


class HttpTransport:
    """aiohttp on the hot path, not the OpenAI SDK. Measured against a stub server on one core
    (Intel Xeon, AVX-512; benchmarks/orchestrator.py): AsyncOpenAI spent 3.07 ms of CPU per chat
    call (request building, httpx/httpcore, pydantic parsing of the reply), aiohttp with orjson
    0.21 ms. At 10k calls the SDK alone was more than the whole orchestrator's budget (1 ms)."""

    def __init__(self, base_url: str, api_key: str, policy: ClientPolicy):
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.policy = policy
        self.proxy = _env_proxy(base_url)
        self.session: aiohttp.ClientSession | None = None  # made on the loop that uses it

    async def __call__(self, url: str, body: bytes) -> tuple[int, bytes]:
        if self.session is None:  # no timer of its own: EndpointClient times each request (one timer, not two)
            self.session = aiohttp.ClientSession(headers=self.headers, timeout=aiohttp.ClientTimeout(total=None),
                                                 connector=aiohttp.TCPConnector(limit=self.policy.max_concurrency))
        try:
            async with self.session.post(url, data=body, proxy=self.proxy) as resp:
                return resp.status, await resp.read()
        except aiohttp.ClientError as exc:
            raise APIConnectionError(f"Connection error: {type(exc).__name__}: {exc}") from exc

    async def aclose(self) -> None:
        if self.session is not None:
            await self.session.close()


def _env_proxy(url: str) -> str | None:
    """The proxy HTTP(S)_PROXY / NO_PROXY name for `url`, looked up once: aiohttp's trust_env
    looks it up, and reads ~/.netrc, in a worker thread on every request."""
    from urllib.parse import urlsplit
    from urllib.request import getproxies_environment, proxy_bypass_environment

    parts = urlsplit(url)
    proxies = getproxies_environment()
    if not proxies.get(parts.scheme) or proxy_bypass_environment(parts.hostname or ""):
        return None
    return proxies[parts.scheme]


Limit = asyncio.Semaphore | AdaptiveLimiter


def new_limit(policy: ClientPolicy) -> Limit:
    """The in-flight limit `policy` asks for: a fixed semaphore, or the adaptive one (toa.aimd)."""
    if policy.adaptive:
        return AdaptiveLimiter(AimdController(policy.max_concurrency, policy.adaptive_start))
    return asyncio.Semaphore(policy.max_concurrency)


class EndpointClient:
    """One agent's endpoint: its transport, its in-flight limit and its sampling parameters.

    The limit is a fixed semaphore of `max_concurrency`, or, with `policy.adaptive`, an
    AdaptiveLimiter (toa.aimd) that learns it: 429 and 503 answers and timeouts lower it (and
    are retried as ever, waiting for the limiter again), successes raise it up to
    `max_concurrency`."""

    def __init__(self, endpoint: Endpoint, params: dict, policy: ClientPolicy, transport: Transport | None = None,
                 limit: Limit | None = None):
        self.endpoint, self.params, self.policy = endpoint, params, policy
        self.transport = transport or HttpTransport(endpoint.base_url, endpoint.api_key.get_secret_value(), policy)
        self.url = endpoint.base_url.rstrip("/") + "/chat/completions"
        # `limit`: one shared with the other agents of this endpoint (toa.engine.make_clients)
        self.limit: Limit = limit if limit is not None else new_limit(policy)
        self.adaptive: AdaptiveLimiter | None = self.limit if isinstance(self.limit, AdaptiveLimiter) else None
        self.requests = 0  # HTTP requests actually sent (for tests and reports)
        self.stalled: str | None = None  # the watchdog's message once the server stalled
        self._in_flight: set[asyncio.Timeout] = set()  # one per request, to end them on a stall

    async def aclose(self) -> None:
        aclose = getattr(self.transport, "aclose", None)
        if aclose is not None:
            await aclose()

    def fail_in_flight(self, message: str) -> None:
        """End every request in flight, and every later one, with ServerStalled(message).
        Call on the client's loop."""
        self.stalled = message
        now = asyncio.get_running_loop().time()
        for deadline in list(self._in_flight):
            deadline.reschedule(now)

    async def complete(self, messages: list[Message], n: int, seed: int, params: dict | None = None) -> list[_Choice]:
        """n choices in as few requests as the endpoint allows; raises after the retries.
        `params` are the request's sampling fields (default: this endpoint's)."""
        params = self.params if params is None else params
        if self.endpoint.supports_n or n == 1:
            return await self._request(messages, n, seed, params)
        parts = await asyncio.gather(*(self._request(messages, 1, seed + i, params) for i in range(n)))
        return [c for part in parts for c in part]

    def _body(self, messages: list[Message], n: int, seed: int, params: dict) -> bytes:
        """The chat request. Sampling fields, OpenAI's and server-specific ones alike (vLLM's
        `continue_final_message`, ...), travel in the body as given; `logprobs` only where the
        endpoint supports it."""
        body = {"model": self.endpoint.model, "messages": messages, "n": n, "seed": seed,
                **{k: v for k, v in params.items() if k != "logprobs"}}
        if params.get("logprobs") and self.endpoint.supports_logprobs:
            body["logprobs"] = True
        return orjson.dumps(body)

    async def _request(self, messages: list[Message], n: int, seed: int, params: dict) -> list[_Choice]:
        body = self._body(messages, n, seed, params)
        adaptive = self.adaptive
        for attempt in range(self.policy.retries + 1):
            sent = -1  # the adaptive limit's epoch this attempt went out under (toa.aimd); -1: not sent
            try:
                async with self.limit, request_slot(self.policy.global_limits):
                    if self.stalled:
                        raise ServerStalled(self.stalled)
                    self.requests += 1
                    if adaptive is not None:
                        sent = adaptive.epoch
                    # the request's one timer: its timeout, brought forward by fail_in_flight
                    async with asyncio.timeout(self.policy.timeout_s) as deadline:
                        self._in_flight.add(deadline)
                        try:
                            status, reply = await self.transport(self.url, body)
                        finally:
                            self._in_flight.discard(deadline)
                    if adaptive is not None:  # told while the slot is held: the limiter sees it in use
                        adaptive.answered(status, sent)
                if status >= 400:
                    raise status_error(status, reply)
                return _choices(orjson.loads(reply), n)
            except TimeoutError:
                if self.stalled:
                    raise ServerStalled(self.stalled) from None
                if adaptive is not None:
                    adaptive.overloaded(sent)
                if attempt == self.policy.retries:
                    raise APITimeoutError(f"Request timed out after {self.policy.timeout_s} s") from None
            except TRANSIENT:
                if attempt == self.policy.retries:
                    raise
            delay = min(self.policy.backoff_cap_s, self.policy.backoff_s * 2**attempt)  # a transient failure
            await asyncio.sleep(delay * (0.5 + random.random()))
        raise AssertionError("unreachable")


def _choices(resp: dict, n: int) -> list[_Choice]:
    choices = sorted(resp["choices"], key=lambda c: c["index"])
    if len(choices) != n:
        raise ValueError(f"asked for n={n} choices, the server returned {len(choices)}")
    usage = resp.get("usage") or {}
    total = usage.get("completion_tokens") or 0
    prompt = usage.get("prompt_tokens") or 0  # every choice saw the whole prompt
    texts = [(c.get("message") or {}).get("content") for c in choices]
    split = _split_tokens(total, [len(t or "") for t in texts])
    server = _server_seconds(resp)
    out = []
    for c, text, share in zip(choices, texts, split):
        token_logprobs = (c.get("logprobs") or {}).get("content")
        tokens = len(token_logprobs) if token_logprobs is not None else share  # exact when given
        logprob = sum(t["logprob"] for t in token_logprobs) if token_logprobs is not None else None
        out.append(_Choice(text, c.get("finish_reason"), prompt, tokens, logprob, server, n))
    return out


def _server_seconds(resp: dict) -> float | None:
    """The server's time for this request (queue wait excluded), from the reply body where the
    server reports it; None otherwise. vLLM's OpenAI server reports nothing by default; started
    with `--enable-per-request-metrics` (vLLM 0.32) it adds a top-level `metrics` object to
    replies of n = 1 requests: time_to_first_token_ms (scheduled -> first token) +
    generation_time_ms (first -> last token). llama.cpp's server adds `timings`: prompt_ms +
    predicted_ms. Headers are not read (the transport returns the body only)."""
    m = resp.get("metrics")
    if isinstance(m, dict) and m.get("time_to_first_token_ms") is not None and m.get("generation_time_ms") is not None:
        return (m["time_to_first_token_ms"] + m["generation_time_ms"]) / 1000
    t = resp.get("timings")
    if isinstance(t, dict) and t.get("prompt_ms") is not None and t.get("predicted_ms") is not None:
        return (t["prompt_ms"] + t["predicted_ms"]) / 1000
    return None


def _split_tokens(total: int, lengths: list[int]) -> list[int]:
    """`total` tokens over choices in proportion to their text lengths (largest remainder, so
    the shares add up to the server's count exactly)."""
    weights = lengths if sum(lengths) else [1] * len(lengths)
    raw = [total * w / sum(weights) for w in weights]
    shares = [int(r) for r in raw]
    by_remainder = sorted(range(len(raw)), key=lambda i: raw[i] - shares[i], reverse=True)
    for i in by_remainder[: total - sum(shares)]:
        shares[i] += 1
    return shares


def _describe(exc: BaseException, secret: str | None = None) -> str:
    """The recorded error message. Some servers echo the offered API key in a 401 body
    ("Incorrect API key provided: sk-..."): the key is cut out before anything is stored."""
    status = getattr(exc, "status_code", None)
    text = str(exc)
    if secret and len(secret) >= 4:
        text = text.replace(secret, "**********")
    return f"{type(exc).__name__}{f' {status}' if status else ''}: {text[:500]}"


class CallLayer:
    """Cache-first access to the endpoints for one batch of prompts.

    `cache` holds the recorded calls of this batch (ok ones are replayed); every new record,
    success or error, goes to `sink` exactly once. Identical slots requested concurrently are
    made once (in-flight deduplication)."""

    def __init__(self, clients: Mapping[str, EndpointClient], cache: Mapping[str, CallRecord],
                 sink: Callable[[CallRecord], None], run_seed: int, namespace: str = ""):
        self.clients, self.sink, self.run_seed, self.namespace = clients, sink, run_seed, namespace
        self.cache: dict[str, CallRecord] = {k: r for k, r in cache.items() if r.status == OK}
        self.inflight: dict[str, asyncio.Future] = {}
        self.made = Counter()  # new calls per agent (samples generated, not served from cache)
        self.failed = Counter()

    def for_prompt(self, prompt_id: str) -> PromptGenerate:
        return PromptGenerate(self, prompt_id)

    async def generate(self, prompt_id: str, agent: str, messages: list[Message], n: int, first_slot: int,
                       sampling: dict | None = None) -> list[Generation]:
        client = self.clients[agent]
        request = {"messages": messages, **client.params, **(sampling or {})}
        base = content_key(self.namespace, client.endpoint.identity, request, self.run_seed)
        keys = [content_key(base, slot) for slot in range(first_slot, first_slot + n)]
        pending = {k: self.inflight[k] for k in keys if k in self.inflight}  # made by another caller
        todo = [i for i, k in enumerate(keys) if k not in self.cache and k not in pending]
        made: dict[str, CallRecord] = {}
        if todo:
            seed = int(content_key(base, first_slot + todo[0])[:8], 16) & 0x7FFFFFFF
            made = await self._fill(prompt_id, agent, client, request, [keys[i] for i in todo],
                                    [first_slot + i for i in todo], seed)
        out = []
        for k in keys:
            if k in made:
                record, cached = made[k], False
            elif k in pending:
                record, cached = await asyncio.shield(pending[k]), False
            else:
                record, cached = self.cache[k], True
            out.append(_generation(record, cached))
        return out

    async def _fill(self, prompt_id, agent, client, request, keys, slots, seed) -> dict[str, CallRecord]:
        loop = asyncio.get_running_loop()
        self.inflight.update({k: loop.create_future() for k in keys})
        start = time.perf_counter()
        try:
            try:
                params = {k: v for k, v in request.items() if k != "messages"}
                choices: list[_Choice | None] = await client.complete(request["messages"], len(keys), seed, params)
                error = None
            except Exception as exc:  # recorded as data; the next run retries it
                choices, error = [None] * len(keys), _describe(exc, client.endpoint.api_key.get_secret_value())
            latency = time.perf_counter() - start
            request_json = orjson.dumps(request).decode()
            made = {}
            for key, slot, choice in zip(keys, slots, choices):
                record = CallRecord(
                    call_key=key, prompt_id=prompt_id, agent=agent, model=client.endpoint.identity,
                    request_json=request_json, seed=seed, slot=slot,
                    text=choice.text if choice else None, finish_reason=choice.finish_reason if choice else None,
                    prompt_tokens=choice.prompt_tokens if choice else 0,
                    completion_tokens=choice.completion_tokens if choice else 0,
                    latency_s=latency, status=OK if choice else ERROR, error=error, created_at=time.time(),
                    logprob=choice.logprob if choice else None,
                    server_s=choice.server_s if choice else None,
                    request_choices=choice.request_choices if choice else None,
                )
                self.sink(record)
                (self.made if choice else self.failed)[agent] += 1
                if choice:
                    self.cache[key] = record
                made[key] = record
                self.inflight[key].set_result(record)
            return made
        finally:  # a cancelled call must not leave other callers waiting forever
            for key in keys:
                fut = self.inflight.pop(key, None)
                if fut is not None and not fut.done():
                    fut.cancel()


def _generation(record: CallRecord, cached: bool) -> Generation:
    return Generation(
        sample_id=record.call_key, agent=record.agent, text=record.text,
        finish_reason=record.finish_reason, prompt_tokens=record.prompt_tokens,
        completion_tokens=record.completion_tokens, latency_s=record.latency_s,
        status=record.status, error=record.error, cached=cached, logprob=record.logprob,
    )


class PromptGenerate:
    """The `generate` callable a method receives for one prompt: counts slots per (agent,
    messages) so that repeated identical requests get fresh samples, deterministically."""

    def __init__(self, layer: CallLayer, prompt_id: str):
        self.layer, self.prompt_id = layer, prompt_id
        self.next_slot: Counter = Counter()

    async def __call__(self, agent: str, messages: list[Message], n: int = 1, **sampling) -> list[Generation]:
        """n samples from `agent`; `sampling` overrides this agent's sampling fields for this
        request (e.g. stop=["\\n"], max_tokens=64) and is part of the cache key."""
        if agent not in self.layer.clients:
            raise KeyError(f"unknown agent {agent!r}; configured: {list(self.layer.clients)}")
        # Slots count per request content, not per alias: two aliases of one model with the same
        # sampling then draw distinct samples instead of sharing slot 0 (same key, same record).
        client = self.layer.clients[agent]
        slot_key = orjson.dumps([client.endpoint.identity, client.params, messages, sampling], option=orjson.OPT_SORT_KEYS)
        first = self.next_slot[slot_key]
        self.next_slot[slot_key] += n  # reserved before awaiting: order is the call order
        return await self.layer.generate(self.prompt_id, agent, messages, n, first, sampling or None)
