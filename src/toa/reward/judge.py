"""LLM-as-a-judge reward: any OpenAI-compatible chat model rates a response, pointwise.

The rubric is `toa/templates/judge.txt` (this project's own wording): stable instructions first,
then the question and the answer, then one fixed line asking for the rating. It is sent as one
user message; decoding is greedy (temperature 0) with `max_tokens` 8 (default) and
`top_logprobs` 20 (vLLM's default `max_logprobs`).

Scale 1-9, not 1-10: every rating is then a single digit, and so a single token in common
tokenizers (SmolLM2's splits "10" into "1", "0", which would make 1 and 10 the same first
token). The score is

- with logprobs (vLLM and most OpenAI-compatible servers return them): the expectation of the
  rating over the rating tokens' probabilities at the first generated token that is a rating
  digit (normally the very first token), renormalised over the rating tokens of that position's
  top_logprobs (" 7" and "7" count as the same rating). `mass`, the probability those rating
  tokens had before renormalising, is recorded: a low mass says the judge barely meant a rating.
- without logprobs: the first whole number in the reply, if it lies on the scale.
- neither: an error Score ("unparseable judge output: ..."), never a number.

A failed request (connection refused, wrong key, timeout after the client's own retries) is an
error Score for its item; the other items of the batch still get their values.

Where the judge's raw output is kept: the ok Score returned by `score_batch` carries a compact
note in `error` ("raw='7' mass=0.93 via=logprobs"), which the service records with the reward
and replays with it; the full result is also kept in `last_outputs` (a bounded dict keyed by
`reward_key`, newest `keep_outputs` entries, default 10000) as a `JudgeOutput` (raw text, value,
mass, path).

Identity = "judge:<endpoint identity>:tpl=<template sha>[:<decoding>]": a different model,
template or decoding setting is a different reward. The endpoint identity carries its declared
revision, and a model changed behind the same URL and name is caught by its behavioural
fingerprint (toa.identity.verify_attached) before any reward is replayed. Concurrency: one AsyncOpenAI client per
backend, up to `max_concurrency` (default 16) requests in flight; a judge is a chat model that
batches concurrent requests on its server, so there is no benefit in a list request.
"""

from __future__ import annotations

import asyncio
import math
import re
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from typing import Any

from toa.reward.service import error_score, reward_key
from toa.rows import ERROR, OK, Prompt, Score
from toa.servers.spec import Endpoint
from toa.templates import Template, parse

RATINGS = range(1, 10)  # the scale: single digits only (see module docstring)
TOP_LOGPROBS = 20  # vLLM's default --max-logprobs; more alternatives than the 9 ratings need
MAX_TOKENS = 8  # a digit, maybe a space or newline first; more would only cost time
_NUMBER = re.compile(r"(?<!\d)\d+(?!\d)")


@dataclass(frozen=True)
class JudgeOutput:
    """What the judge said about one item: its raw reply and how it became a value."""

    raw: str
    value: float | None
    mass: float | None  # probability on rating tokens at the rating position (logprob path)
    via: str  # "logprobs" | "text" | "unparsed"


def load_template(path: str | None = None) -> Template:
    """The packaged rubric, or a user's file in the same format (header lines, {question},
    {answer})."""
    if path is None:
        content = resources.files("toa.templates").joinpath("judge.txt").read_text("utf-8")
    else:
        with open(path, encoding="utf-8") as f:
            content = f.read()
    return parse("judge", content)


# ---------------------------------------------------------------------------- pure parsing

def rating_of(token: str) -> int | None:
    """The rating a token stands for ('7', ' 7', '7\\n'), else None."""
    text = token.strip()
    if len(text) == 1 and text.isdigit() and int(text) in RATINGS:
        return int(text)
    return None


def expectation(top: Iterable[tuple[str, float]]) -> tuple[float, float] | None:
    """(expected rating, mass) from one position's (token, logprob) alternatives, or None when
    none of them is a rating. Variants of one rating (' 7', '7') add up."""
    probs: dict[int, float] = {}
    for token, logprob in top:
        rating = rating_of(token)
        if rating is not None and logprob is not None and math.isfinite(logprob):
            probs[rating] = probs.get(rating, 0.0) + math.exp(logprob)
    mass = sum(probs.values())
    if mass <= 0:
        return None
    return sum(r * p for r, p in probs.items()) / mass, mass


def from_logprobs(tokens: list[tuple[str, list[tuple[str, float]]]]) -> tuple[float, float] | None:
    """Expectation at the first generated token that is a rating digit. A digit followed by
    another digit is a number off the scale (e.g. '10'): no logprob value then."""
    for i, (token, top) in enumerate(tokens):
        if rating_of(token) is None:
            if any(c.isdigit() for c in token):
                return None  # a number that is not a lone rating digit ('10', '0', '12')
            continue
        following = tokens[i + 1][0] if i + 1 < len(tokens) else ""
        if following[:1].isdigit():
            return None
        return expectation(top)
    return None


def from_text(text: str) -> int | None:
    """The first whole number of the reply if it lies on the scale."""
    match = _NUMBER.search(text)
    if match is None:
        return None
    number = int(match.group())
    return number if number in RATINGS else None


def judge_output(text: str, tokens: list[tuple[str, list[tuple[str, float]]]] | None) -> JudgeOutput:
    """Turn one reply (and its logprobs, if any) into a JudgeOutput."""
    if tokens:
        found = from_logprobs(tokens)
        if found is not None:
            return JudgeOutput(text, found[0], found[1], "logprobs")
    number = from_text(text)
    if number is not None:
        return JudgeOutput(text, float(number), None, "text")
    return JudgeOutput(text, None, None, "unparsed")


def to_score(out: JudgeOutput) -> Score:
    if out.value is None:
        return Score(None, ERROR, f"unparseable judge output: raw={out.raw[:200]!r}")
    mass = f"{out.mass:.3f}" if out.mass is not None else "none"
    return Score(out.value, OK, f"raw={out.raw[:80]!r} mass={mass} via={out.via}")


def _tokens(choice: Any) -> list[tuple[str, list[tuple[str, float]]]] | None:
    """[(token, [(alternative, logprob), ...]), ...] from an OpenAI chat choice, or None."""
    content = getattr(getattr(choice, "logprobs", None), "content", None)
    if not content:
        return None
    return [(t.token, [(a.token, a.logprob) for a in (t.top_logprobs or [])]) for t in content]


# ---------------------------------------------------------------------------- the backend

class JudgeReward:
    """RewardBackend: a chat model rates each (prompt, response) on the 1-9 rubric."""

    def __init__(self, endpoint: Endpoint, *, template_path: str | None = None,
                 max_concurrency: int = 16, timeout_s: float = 120.0, max_retries: int = 2,
                 max_tokens: int = MAX_TOKENS, keep_outputs: int = 10_000) -> None:
        from openai import AsyncOpenAI  # lazy: importing toa.reward stays cheap

        self.endpoint = endpoint
        self.template = load_template(template_path)
        self.max_tokens = max_tokens
        decoding = "" if max_tokens == MAX_TOKENS else f":max_tokens={max_tokens}"
        self.identity = f"judge:{endpoint.identity}:tpl={self.template.sha}{decoding}"
        self._new_client = lambda: AsyncOpenAI(  # retries connection errors, 429, 5xx itself
            base_url=endpoint.base_url, api_key=endpoint.api_key.get_secret_value(),
            timeout=timeout_s, max_retries=max_retries)
        self._max_concurrency = max_concurrency
        self._client: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop _client belongs to
        self._limit = asyncio.Semaphore(max_concurrency)
        self._keep = keep_outputs
        self.last_outputs: OrderedDict[str, JudgeOutput] = OrderedDict()

    async def score_batch(self, items: list[tuple[Prompt, str]]) -> list[Score]:
        self._bind_loop()
        return list(await asyncio.gather(*(self._score_one(p, r) for p, r in items)))

    def _bind_loop(self) -> None:
        """One client per event loop: an async client's connections belong to its loop (a
        Prefect retry runs a fresh asyncio.run)."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._client, self._loop = self._new_client(), loop
            self._limit = asyncio.Semaphore(self._max_concurrency)

    async def aclose(self) -> None:
        client, self._client, self._loop = self._client, None, None
        if client is not None:
            await client.close()

    def close(self) -> None:
        """Synchronous close: inside a loop the client closes in a task; outside one its loop
        is gone and only the reference is dropped (its sockets close with it)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._client, self._loop = None, None
        else:
            loop.create_task(self.aclose())

    # ---- one item -----------------------------------------------------------------------
    async def _score_one(self, prompt: Prompt, response: str) -> Score:
        try:
            async with self._limit:
                choice = await self._ask(prompt.text, response)
        except Exception as exc:  # noqa: BLE001  (errors are data: this item only)
            return error_score(exc)
        out = judge_output(choice.message.content or "", _tokens(choice))
        self._remember(reward_key(self.identity, prompt, response), out)
        return to_score(out)

    async def _ask(self, question: str, answer: str) -> Any:
        content = self.template.render(question=question, answer=answer)
        resp = await self._client.chat.completions.create(
            model=self.endpoint.model, messages=[{"role": "user", "content": content}],
            temperature=0.0, max_tokens=self.max_tokens, logprobs=True,
            top_logprobs=TOP_LOGPROBS)
        if not resp.choices:
            raise ValueError("judge returned no choices")
        return resp.choices[0]

    def _remember(self, key: str, out: JudgeOutput) -> None:
        self.last_outputs[key] = out
        self.last_outputs.move_to_end(key)
        while len(self.last_outputs) > self._keep:
            self.last_outputs.popitem(last=False)


__all__ = [
    "RATINGS",
    "JudgeOutput",
    "JudgeReward",
    "expectation",
    "from_logprobs",
    "from_text",
    "judge_output",
    "load_template",
    "rating_of",
]
