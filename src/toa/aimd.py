"""Adaptive concurrency per endpoint: AIMD (additive increase, multiplicative decrease) of the
requests in flight, as TCP congestion control does with its window (RFC 5681).

An endpoint toa did not start (a hosted API, a vLLM someone else runs and shares) has a
capacity toa cannot know: a fixed `max_concurrency` either leaves it idle or floods it with
requests it answers 429/503, or queues. `AimdController` learns the limit from the answers:

- +1 after each window of successes (one success per request the limit allows: classic AIMD,
  one step per round trip), or +1 per success (doubling per window, TCP's slow start) until
  the first overload signal;
- x`decrease` (0.5) on an overload signal: a 429 or 503 answer, a request timeout, or the
  server's queue depth (vLLM `vllm:num_requests_waiting`, toa.servers.watch) above
  `queue_threshold`;
- never below 1, never above the ceiling (`max_concurrency`).

Cooldown, so that one burst of 429s halves once, not once per 429: every request carries the
controller's `epoch` (the number of decreases so far) from when it was sent; a failure of a
request sent before the latest decrease was sent under the old limit and says nothing about the
new one, so it is ignored (TCP NewReno's one decrease per window). A queue-depth reading has no
request to date it: it counts only once `limit` requests have finished since the latest
decrease, i.e. once the requests in flight have drained to the new limit and the server's
queue can reflect it.

`AdaptiveLimiter` is the asyncio side: a semaphore whose capacity is the controller's limit.
Both are used by the request layer (toa.calls.EndpointClient) when an agent's
`adaptive_concurrency` is on (the default for attached endpoints; toa.config.AgentConfig).
"""

from __future__ import annotations

import asyncio
from collections import deque

START = 8  # a first limit that no server worth attaching to refuses; slow start doubles it per window
DECREASE = 0.5
OVERLOADED = (429, 503)  # answers that mean "fewer at once" (timeouts too); other errors say nothing
QUEUE_THRESHOLD = 8.0  # vLLM requests waiting beyond these few (its scheduler admits per step) mean overload


class AimdController:
    """The current limit on requests in flight to one endpoint. Plain Python: fed outcomes, no clock.

    Callers read `epoch` when a request is sent and hand it back with the outcome
    (`on_success`, `on_overload`)."""

    __slots__ = (
        "ceiling",
        "decrease",
        "epoch",
        "finished_since_decrease",
        "limit",
        "queue_threshold",
        "slow_start",
        "successes",
    )

    def __init__(self, ceiling: int, start: int = START, decrease: float = DECREASE,
                 queue_threshold: float | None = QUEUE_THRESHOLD, slow_start: bool = True):
        if ceiling < 1 or not 0 < decrease < 1:
            raise ValueError(f"need ceiling >= 1 and 0 < decrease < 1, got {ceiling}, {decrease}")
        self.ceiling, self.decrease, self.queue_threshold = ceiling, decrease, queue_threshold
        self.limit = max(1, min(ceiling, start))
        self.epoch = 0  # decreases so far: the date a request is sent under (and a count for reports)
        self.slow_start = slow_start  # until the first decrease
        self.successes = 0  # towards the next +1
        self.finished_since_decrease = 0  # dates queue-depth readings (see the module docstring)

    def on_success(self, epoch: int, saturated: bool = True) -> bool:
        """A request sent at `epoch` was answered. Only a request that found the limit in use
        (`saturated`) counts towards growth: a limit the callers never reach was not tested
        (RFC 7661), and growing it anyway would flood the server when a burst comes.
        True when the limit grew."""
        self.finished_since_decrease += 1
        if epoch != self.epoch or not saturated or self.limit >= self.ceiling:
            return False
        self.successes += 1
        if not self.slow_start and self.successes < self.limit:
            return False
        self.successes = 0
        self.limit += 1
        return True

    def on_overload(self, epoch: int) -> bool:
        """A request sent at `epoch` met a 429, a 503 or a timeout. True when the limit fell."""
        self.finished_since_decrease += 1
        if epoch != self.epoch:  # sent under the limit before the latest decrease
            return False
        self._decrease()
        return True

    def on_queue_depth(self, waiting: float) -> bool:
        """The server reports `waiting` requests queued. True when the limit fell."""
        if self.queue_threshold is None or waiting <= self.queue_threshold:
            return False
        if self.epoch and self.finished_since_decrease < self.limit:  # the last decrease is still draining
            return False
        self._decrease()
        return True

    def _decrease(self) -> None:
        self.limit = max(1, int(self.limit * self.decrease))
        self.epoch += 1
        self.slow_start = False
        self.successes = 0
        self.finished_since_decrease = 0


class AdaptiveLimiter:
    """An asyncio semaphore whose capacity is `controller.limit`, which may change at any time:
    `acquire` waits while `in_flight >= limit`; a limit that grows wakes waiters, one that
    shrinks lets the requests in flight finish and admits none until they are under it.
    First come, first served (no barging past a waiter). One event loop, like asyncio.Semaphore.

    Per request it costs what a Semaphore does: no allocation unless the caller has to wait."""

    __slots__ = ("_waiters", "controller", "in_flight")

    def __init__(self, controller: AimdController):
        self.controller = controller
        self.in_flight = 0
        self._waiters: deque[asyncio.Future] = deque()

    @property
    def limit(self) -> int:
        return self.controller.limit

    @property
    def epoch(self) -> int:
        return self.controller.epoch

    async def acquire(self) -> None:
        if not self._waiters and self.in_flight < self.controller.limit:
            self.in_flight += 1
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter  # the slot is handed over by _wake (in_flight already counts it)
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():  # granted, then cancelled before running
                self.release()
            elif waiter in self._waiters:  # (_wake drops cancelled waiters it meets)
                self._waiters.remove(waiter)
            raise

    def release(self) -> None:
        self.in_flight -= 1
        self._wake()

    def _wake(self) -> None:
        waiters, controller = self._waiters, self.controller
        while waiters and self.in_flight < controller.limit:
            waiter = waiters.popleft()
            if not waiter.done():
                self.in_flight += 1
                waiter.set_result(None)

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, *exc) -> None:
        self.release()

    # -- outcomes: call while still holding the slot, with the epoch read when the request was sent
    def answered(self, status: int, epoch: int) -> None:
        """An HTTP answer: a success, an overload (429, 503), or neither (another error)."""
        if status < 400:
            self.succeeded(epoch)
        elif status in OVERLOADED:
            self.overloaded(epoch)

    def succeeded(self, epoch: int) -> None:
        if self.controller.on_success(epoch, self.in_flight >= self.controller.limit or bool(self._waiters)):
            self._wake()

    def overloaded(self, epoch: int) -> None:
        self.controller.on_overload(epoch)

    def queue_depth(self, waiting: float) -> None:
        self.controller.on_queue_depth(waiting)
