"""The reward service: one place every reward goes through (docs/design.md §4.1, §4.3, §4.6).

`RewardService.score(prompt, responses)` is the `reward` callable a method sees. Behind it:

- content-addressed cache: key = sha256(backend identity, prompt text, reference, response)
  (`reward_key`). An ok record is served without a backend call, with its note (`replayed_score`);
  an error record is NOT served, so a failure is retried on the next attempt (errors are data,
  never a silent 0).
- micro-batching across concurrent callers: many prompts' methods run at once in one event
  loop; their items are gathered until `max_batch` items (default 64, one embedding batch) or
  `max_wait_s` (default 10 ms: long enough for every coroutine woken in the same loop tick to
  enqueue, short next to a model call), then one backend call scores the whole batch.
- in-flight dedupe: an item already queued or being scored is awaited, not scored twice.
- retries: a backend call that raises is retried `retries` times (default 2) with exponential
  backoff (`backoff_s` * 2**attempt); after that every item of the batch becomes
  Score(None, "error", "<ExceptionType>: message").
- recording: each newly computed result (ok or error) goes once to `sink` as a RewardRecord.
  The record is added to the in-memory cache only after the sink accepted it, so what this
  process serves from memory is also what storage holds.

No normalisation happens here: raw backend values go out (TOA's sigmoid belongs to the method).
`max_concurrent_batches` (default 1) bounds backend calls in flight: a CPU model gains nothing
from two batches fighting over the same cores, and while one batch runs the next one fills up.
A remote (HTTP) backend may raise it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from toa.rows import ERROR, OK, Prompt, RewardRecord, Score, content_key

log = logging.getLogger(__name__)


@runtime_checkable
class RewardBackend(Protocol):
    """Scores (prompt, response) pairs. `identity` names everything that changes a value:
    backend kind, model name, revision / weights hash, template hash if any. `score_batch`
    returns one Score per item, in order; it may raise (the service retries); CPU-heavy work
    runs in a thread (asyncio.to_thread) so the event loop stays free."""

    identity: str

    async def score_batch(self, items: list[tuple[Prompt, str]]) -> list[Score]: ...


def reward_key(identity: str, prompt: Prompt, response: str) -> str:
    """The content key of one reward: the prompt id is not part of it (same text, same reward)."""
    return content_key(identity, prompt.text, prompt.reference, response)


def response_sha(response: str) -> str:
    return hashlib.sha256(response.encode("utf-8")).hexdigest()


def cache_from_records(records: Iterable[RewardRecord]) -> dict[str, RewardRecord]:
    """A cache for `RewardService` from stored records; an ok record wins over an error one
    for the same key (the error was retried and succeeded later)."""
    cache: dict[str, RewardRecord] = {}
    for rec in records:
        old = cache.get(rec.reward_key)
        if old is None or old.status != OK:
            cache[rec.reward_key] = rec
    return cache


def replayed_score(rec: RewardRecord) -> Score:
    """The Score a recorded reward replays as: its value, status and note exactly as first
    computed (`_finish` stores what `_checked` returned), so a resumed run's samples rows equal
    an uninterrupted run's (docs/design.md §4.1): the transformers backend's "truncated" mark and
    a judge's raw output survive a rerun."""
    return Score(rec.value, rec.status, rec.error)


def error_score(exc: BaseException) -> Score:
    return Score(None, ERROR, f"{type(exc).__name__}: {exc}")


@dataclass
class _Item:
    key: str
    prompt: Prompt
    response: str
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)


class RewardService:
    """Cached, micro-batched, deduplicated, retrying front of one `RewardBackend`."""

    def __init__(
        self,
        backend: RewardBackend,
        cache: Mapping[str, RewardRecord] | None = None,
        sink: Callable[[RewardRecord], None] | None = None,
        max_batch: int = 64,
        max_wait_s: float = 0.01,
        retries: int = 2,
        *,
        backoff_s: float = 0.5,
        max_concurrent_batches: int = 1,
    ) -> None:
        if max_batch < 1 or max_concurrent_batches < 1 or retries < 0:
            raise ValueError("max_batch and max_concurrent_batches must be >= 1, retries >= 0")
        self.backend = backend
        self.identity: str = backend.identity
        # Read-only and never copied: the engine keeps adding batches' records to this mapping.
        self._preloaded: Mapping[str, RewardRecord] = cache if cache is not None else {}
        self._new: dict[str, RewardRecord] = {}  # records computed by this service
        self.sink = sink
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_concurrent_batches = max_concurrent_batches
        self._pending: list[_Item] = []
        self._inflight: dict[str, asyncio.Future] = {}  # key -> future, queued or being scored
        self._running = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task] = set()  # strong refs: a running batch is never GC'd
        self.backend_calls = 0  # backend.score_batch invocations, retries included
        self.items_scored = 0  # items sent to the backend (each batch attempt counts once)
        self.cache_hits = 0
        self.dedup_hits = 0

    # ---- public -------------------------------------------------------------------------
    async def score(self, prompt: Prompt, responses: Sequence[str]) -> list[Score]:
        """One Score per response, in order. Backend errors come back as error Scores; only a
        failing `sink` raises (a reward that storage did not take must not look recorded)."""
        self._bind_loop()
        futures = [self._lookup_or_enqueue(prompt, r) for r in responses]
        self._kick()
        # shield: a cancelled caller must not cancel a result other callers share
        return [f if isinstance(f, Score) else await asyncio.shield(f) for f in futures]

    def cached(self, key: str) -> RewardRecord | None:
        """The ok record for `key`, if any (error records are not served)."""
        rec = self._new.get(key) or self._preloaded.get(key)
        return rec if rec is not None and rec.status == OK else None

    @property
    def records(self) -> dict[str, RewardRecord]:
        """Records computed by this service so far (ok and error), by reward key."""
        return dict(self._new)

    def forget(self, keys: Iterable[str]) -> None:
        """Drop computed records the caller no longer needs (they are in storage): keeps a
        long run's memory flat in the number of prompts."""
        for key in keys:
            self._new.pop(key, None)

    # ---- enqueue ------------------------------------------------------------------------
    def _bind_loop(self) -> None:
        """Futures and timers belong to one event loop: a service may move to a new loop (a
        Prefect retry runs a fresh asyncio.run) only when nothing is in flight on the old one."""
        loop = asyncio.get_running_loop()
        if self._loop is loop:
            return
        if self._inflight or self._running:
            raise RuntimeError("RewardService is in use by another event loop; "
                               "create one service per event loop")
        self._loop, self._timer, self._pending = loop, None, []

    def _lookup_or_enqueue(self, prompt: Prompt, response: str) -> Score | asyncio.Future:
        key = reward_key(self.identity, prompt, response)
        rec = self.cached(key)
        if rec is not None:
            self.cache_hits += 1
            return replayed_score(rec)
        fut = self._inflight.get(key)
        if fut is not None:
            self.dedup_hits += 1
            return fut
        fut = asyncio.get_running_loop().create_future()
        self._inflight[key] = fut
        self._pending.append(_Item(key, prompt, response, fut))
        return fut

    # ---- dispatch -----------------------------------------------------------------------
    def _kick(self) -> None:
        """Start batches while a slot is free and a batch is due; else arm the timer."""
        while self._pending and self._running < self.max_concurrent_batches:
            waited = time.monotonic() - self._pending[0].enqueued
            if len(self._pending) < self.max_batch and waited < self.max_wait_s:
                self._arm_timer(self.max_wait_s - waited)
                return
            batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch:]
            self._launch(batch)

    def _arm_timer(self, delay: float) -> None:
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._kick()

    def _launch(self, batch: list[_Item]) -> None:
        self._running += 1
        task = asyncio.get_running_loop().create_task(self._run_batch(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_batch(self, batch: list[_Item]) -> None:
        try:
            scores, latency = await self._call_with_retries(batch)
            for item, score in zip(batch, scores):
                self._finish(item, score, latency)
        except BaseException as exc:
            for item in batch:
                self._fail(item, exc)
            if not isinstance(exc, Exception):
                raise
        finally:
            self._running -= 1
            self._kick()

    async def _call_with_retries(self, batch: list[_Item]) -> tuple[list[Score], float]:
        """(scores, wall seconds of all attempts); a batch that keeps failing becomes errors."""
        items = [(it.prompt, it.response) for it in batch]
        start = time.monotonic()
        for attempt in range(self.retries + 1):
            self.backend_calls += 1
            self.items_scored += len(items)
            try:
                scores = await self.backend.score_batch(items)
                if len(scores) != len(items):
                    raise ValueError(f"backend returned {len(scores)} scores "
                                     f"for {len(items)} items")
                return list(scores), time.monotonic() - start
            except Exception as exc:  # noqa: BLE001  (any backend failure is retried, then data)
                log.warning("reward batch of %d failed (attempt %d/%d): %s: %s", len(items),
                            attempt + 1, self.retries + 1, type(exc).__name__, exc)
                if attempt == self.retries:
                    return [error_score(exc)] * len(items), time.monotonic() - start
                await asyncio.sleep(self.backoff_s * 2 ** attempt)
        raise AssertionError("unreachable")

    # ---- results ------------------------------------------------------------------------
    def _finish(self, item: _Item, score: Score, latency: float) -> None:
        score = _checked(score)
        rec = RewardRecord(
            reward_key=item.key, reward_id=self.identity, prompt_id=item.prompt.prompt_id,
            response_sha=response_sha(item.response), value=score.value, status=score.status,
            error=score.error, latency_s=latency, created_at=time.time(),
        )
        try:
            if self.sink is not None:
                self.sink(rec)
        except Exception as exc:  # noqa: BLE001  (an unrecorded reward must not look recorded)
            self._fail(item, exc)
            return
        self._new[item.key] = rec
        self._inflight.pop(item.key, None)
        if not item.future.done():
            item.future.set_result(score)

    def _fail(self, item: _Item, exc: BaseException) -> None:
        """The sink or the service itself failed: the caller sees the exception (not a score)."""
        self._inflight.pop(item.key, None)
        if item.future.done():
            return
        if isinstance(exc, asyncio.CancelledError):
            item.future.cancel()
        else:
            item.future.set_exception(exc)


def _checked(score: Score) -> Score:
    """A backend "ok" without a finite value is not a reward: it becomes an error, never a 0."""
    if score.status == OK and score.value is not None and math.isfinite(score.value):
        # An ok score may carry a note (e.g. "truncated to 4096 tokens", a judge's raw output):
        # it is stored with the record, so the mark survives into the samples table.
        return Score(float(score.value), OK, score.error)
    if score.status == OK:
        return Score(None, ERROR, f"backend returned a non-finite value: {score.value!r}")
    return Score(None, ERROR, score.error or "backend returned an error without a message")


__all__ = ["RewardBackend", "RewardService", "cache_from_records", "replayed_score", "response_sha", "reward_key"]
