"""The request layer: every model call goes through here, recorded once under a content key.

One AsyncOpenAI client per endpoint, a per-endpoint limit on requests in flight, a timeout,
and retries with exponential backoff on transient failures only (connection errors, timeouts,
429 and 5xx); a 4xx such as a prompt longer than the context fails at once.

The cache key of a sample slot is sha256(method, model identity, messages, sampling parameters,
run seed, slot), where slot counts how often this prompt has asked this agent these exact
messages. Asking again therefore yields the next slot, and a rerun of the same method asks for
the same slots in the same order, so it is served from the record and makes zero model calls.
The method is part of the key so that each method pays for (and owns) its own budget: methods
running at once never race for a shared sample.

Several slots are requested in one call with `n=k` where the endpoint supports it (vLLM shares
the prompt prefill); per-choice completion tokens then come from the returned logprobs.
A failed call is recorded with status "error" and its message and is retried on the next run.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Mapping

import openai
from openai import AsyncOpenAI

from toa.methods.base import Message
from toa.rows import ERROR, OK, CallRecord, Generation, content_key
from toa.servers import Endpoint

TRANSIENT = (openai.APIConnectionError, openai.APITimeoutError, openai.RateLimitError, openai.InternalServerError)


@dataclass(frozen=True)
class ClientPolicy:
    max_concurrency: int = 64
    timeout_s: float = 300.0
    retries: int = 4
    backoff_s: float = 0.5  # first retry waits ~0.5 s, then 1, 2, 4 ... (capped) with jitter
    backoff_cap_s: float = 20.0


@dataclass(frozen=True)
class _Choice:
    text: str | None
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int


class EndpointClient:
    """One endpoint: an AsyncOpenAI client, its in-flight limit and its sampling parameters."""

    def __init__(self, endpoint: Endpoint, params: dict, policy: ClientPolicy, http_client=None):
        self.endpoint, self.params, self.policy = endpoint, params, policy
        self.client = AsyncOpenAI(
            base_url=endpoint.base_url, api_key=endpoint.api_key.get_secret_value(),
            timeout=policy.timeout_s, max_retries=0,  # retries are ours: counted and recorded
            http_client=http_client,
        )
        self.limit = asyncio.Semaphore(policy.max_concurrency)
        self.requests = 0  # HTTP requests actually sent (for tests and reports)

    async def complete(self, messages: list[Message], n: int, seed: int) -> list[_Choice]:
        """n choices in as few requests as the endpoint allows; raises after the retries."""
        if self.endpoint.supports_n or n == 1:
            return await self._request(messages, n, seed)
        parts = await asyncio.gather(*(self._request(messages, 1, seed + i) for i in range(n)))
        return [c for part in parts for c in part]

    async def _request(self, messages: list[Message], n: int, seed: int) -> list[_Choice]:
        for attempt in range(self.policy.retries + 1):
            try:
                async with self.limit:
                    self.requests += 1
                    resp = await self.client.chat.completions.create(
                        model=self.endpoint.model, messages=messages, n=n, seed=seed,
                        logprobs=n > 1 or None, **self.params,
                    )
                return _choices(resp, n)
            except TRANSIENT:
                if attempt == self.policy.retries:
                    raise
                delay = min(self.policy.backoff_cap_s, self.policy.backoff_s * 2**attempt)
                await asyncio.sleep(delay * (0.5 + random.random()))
        raise AssertionError("unreachable")


def _choices(resp, n: int) -> list[_Choice]:
    choices = sorted(resp.choices, key=lambda c: c.index)
    if len(choices) != n:
        raise ValueError(f"asked for n={n} choices, the server returned {len(choices)}")
    total = resp.usage.completion_tokens if resp.usage else 0
    prompt = resp.usage.prompt_tokens if resp.usage else 0  # every choice saw the whole prompt
    out = []
    for c in choices:
        if n == 1:
            tokens = total
        elif c.logprobs is not None and c.logprobs.content is not None:
            tokens = len(c.logprobs.content)  # exact per-choice count
        else:
            tokens = round(total / n)  # server gave no per-choice detail: even split
        out.append(_Choice(c.message.content, c.finish_reason, prompt, tokens))
    return out


def _describe(exc: BaseException) -> str:
    status = getattr(exc, "status_code", None)
    return f"{type(exc).__name__}{f' {status}' if status else ''}: {str(exc)[:500]}"


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

    def for_prompt(self, prompt_id: str) -> "PromptGenerate":
        return PromptGenerate(self, prompt_id)

    async def generate(self, prompt_id: str, agent: str, messages: list[Message], n: int, first_slot: int) -> list[Generation]:
        client = self.clients[agent]
        request = {"messages": messages, **client.params}
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
                choices: list[_Choice | None] = await client.complete(request["messages"], len(keys), seed)
                error = None
            except Exception as exc:  # recorded as data; the next run retries it
                choices, error = [None] * len(keys), _describe(exc)
            latency = time.perf_counter() - start
            made = {}
            for key, slot, choice in zip(keys, slots, choices):
                record = CallRecord(
                    call_key=key, prompt_id=prompt_id, agent=agent, model=client.endpoint.identity,
                    request_json=json.dumps(request, ensure_ascii=False), seed=seed, slot=slot,
                    text=choice.text if choice else None, finish_reason=choice.finish_reason if choice else None,
                    prompt_tokens=choice.prompt_tokens if choice else 0,
                    completion_tokens=choice.completion_tokens if choice else 0,
                    latency_s=latency, status=OK if choice else ERROR, error=error, created_at=time.time(),
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
        status=record.status, error=record.error, cached=cached,
    )


class PromptGenerate:
    """The `generate` callable a method receives for one prompt: counts slots per (agent,
    messages) so that repeated identical requests get fresh samples, deterministically."""

    def __init__(self, layer: CallLayer, prompt_id: str):
        self.layer, self.prompt_id = layer, prompt_id
        self.next_slot: Counter = Counter()

    async def __call__(self, agent: str, messages: list[Message], n: int = 1) -> list[Generation]:
        if agent not in self.layer.clients:
            raise KeyError(f"unknown agent {agent!r}; configured: {list(self.layer.clients)}")
        slot_key = (agent, json.dumps(messages, sort_keys=True))
        first = self.next_slot[slot_key]
        self.next_slot[slot_key] += n  # reserved before awaiting: order is the call order
        return await self.layer.generate(self.prompt_id, agent, messages, n, first)
