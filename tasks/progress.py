"""Run progress: prompts done / total and an ETA, as a Prefect progress artifact, one Prefect
event per finished (method, batch), and in-process listeners (the `toa run` progress bar).

Progress counts prompts per method: a run of 2 methods over 16 prompts has 32 to do. A batch
counts when its task finishes; while it runs, the engine reports each prompt it finishes
(the sampling task hands the engine `prompt_done` for its batch), which moves in-process listeners finer than a batch (the artifact
and events stay per batch, to keep API traffic small). A retried batch starts its count over.
The ETA extrapolates from the prompts worked in this run; batches skipped because an earlier
run finished them complete at once and would make the rate look absurd, so they don't count.

Projected cost: with a price on some agent (AgentConfig.price), each finished batch reports
what its new calls cost (BatchStats.cost, toa.units.calls_cost) and the projection is the cost
so far plus its rate per worked prompt times the prompts left (`projected_cost`); it moves per
finished batch, and is absent without a price.

The pure parts (Tracker, eta_seconds, format_eta, projected_cost, format_cost, describe) are
plain Python, unit tested; RunProgress adds the Prefect calls and is driven by the flow as
futures complete.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any


Unit = tuple[str, str]  # (method, batch key)


def eta_seconds(elapsed_s: float, done: int, total: int, skipped: int = 0) -> float | None:
    """Seconds left at the rate of the prompts worked so far (skipped prompts cost nothing and
    don't count toward the rate); 0 when done, None when there is no rate yet."""
    if done >= total:
        return 0.0
    worked = done - skipped
    if worked <= 0 or elapsed_s <= 0:
        return None
    return (total - done) * elapsed_s / worked


def format_eta(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    s = round(seconds)
    if s >= 3600:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s}s"


def projected_cost(cost_so_far: float | None, costed_prompts: int, prompts_left: int) -> float | None:
    """The run's money when it ends: what the batches finished so far cost, plus their cost per
    prompt for every prompt not finished yet. None without a price or before a batch with one
    finished (skipped batches cost nothing and don't set the rate, as for the ETA)."""
    if cost_so_far is None or costed_prompts <= 0:
        return None
    return cost_so_far + cost_so_far / costed_prompts * max(0, prompts_left)


CURRENCY_SIGNS = {"USD": "$", "EUR": "€", "GBP": "£"}


def format_cost(amount: float | None, currency: str | None) -> str:
    """'~$0.42', '~12.30 CHF'; '' without an amount (no price configured)."""
    if amount is None:
        return ""
    digits = 2 if abs(amount) >= 0.1 or amount == 0 else 4
    sign = CURRENCY_SIGNS.get(currency or "")
    return f"~{sign}{amount:,.{digits}f}" if sign else f"~{amount:,.{digits}f} {currency or ''}".rstrip()


@dataclass(frozen=True)
class Snapshot:
    done: int  # prompts finished: whole batches plus prompts of running batches
    total: int
    batches_done: int
    batches_total: int
    failed_batches: int
    eta_s: float | None
    cost: float | None = None  # money of the finished batches' new calls; None: no price
    projected_cost: float | None = None  # projected_cost(): the whole run's, when it ends
    currency: str | None = None

    @property
    def percent(self) -> float:
        return 100.0 if self.total == 0 else 100.0 * self.done / self.total


def describe(run_id: str, snap: Snapshot) -> str:
    """The progress artifact's Markdown description."""
    text = (f"toa run `{run_id}`: **{snap.done} / {snap.total} prompts** ({snap.percent:.0f}%), "
            f"{snap.batches_done} of {snap.batches_total} batches, ETA {format_eta(snap.eta_s)}")
    if snap.projected_cost is not None:
        text += f", cost {format_cost(snap.projected_cost, snap.currency)} projected ({format_cost(snap.cost, snap.currency)} so far)"
    if snap.failed_batches:
        text += f", **{snap.failed_batches} failed** (their prompts are not counted as done)"
    return text


class Tracker:
    """Thread-safe counts of one run: the flow thread finishes batches, the engine loop
    thread reports prompts of running ones."""

    def __init__(self, sizes: dict[Unit, int], clock: Callable[[], float] = time.monotonic):
        self.sizes, self.clock = dict(sizes), clock
        self.started = clock()
        self.partial: dict[Unit, int] = {}  # prompts done by the running attempt of a batch
        self.finished: dict[Unit, int] = {}  # prompts of finished batches
        self.skipped = 0  # prompts of batches an earlier run had finished
        self.failed: set[Unit] = set()
        self.cost: float | None = None  # of the finished batches that reported one
        self.costed_prompts = 0  # the prompts of those batches
        self.currency: str | None = None
        self.lock = threading.Lock()

    def prompt_done(self, unit: Unit, done_in_attempt: int) -> bool:
        """A running batch's attempt has finished this many prompts (0: it (re)started)."""
        with self.lock:
            if unit not in self.sizes or unit in self.finished:
                return False
            self.partial[unit] = min(done_in_attempt, self.sizes[unit])
            return True

    def finish(self, unit: Unit, prompts: int, skipped: bool = False, failed: bool = False,
               cost: float | None = None, currency: str | None = None) -> None:
        """A batch ended; `cost`: what its new calls cost (None: no price, or skipped)."""
        with self.lock:
            self.partial.pop(unit, None)
            if failed:
                self.failed.add(unit)
                return
            self.finished[unit] = prompts
            self.skipped += prompts if skipped else 0
            if cost is not None and not skipped:
                self.cost = (self.cost or 0.0) + cost
                self.costed_prompts += prompts
                self.currency = currency

    def snapshot(self) -> Snapshot:
        with self.lock:
            done = sum(self.finished.values()) + sum(self.partial.values())
            total = sum(self.sizes.values())
            eta = eta_seconds(self.clock() - self.started, done, total, self.skipped)
            if self.failed and eta == 0.0:
                eta = None
            projected = projected_cost(self.cost, self.costed_prompts, total - sum(self.finished.values()))
            return Snapshot(done, total, len(self.finished) + len(self.failed), len(self.sizes), len(self.failed), eta,
                            self.cost, projected, self.currency)


# In-process listeners (e.g. the CLI bar) and the trackers of runs going on in this process.
_LISTENERS: list[Callable[[Snapshot], None]] = []
_TRACKERS: dict[str, Tracker] = {}  # run id -> the tracker of its running sampling
_LOCK = threading.Lock()
_NOTIFY_LOCK = threading.Lock()


@contextmanager
def listen(listener: Callable[[Snapshot], None]) -> Iterator[None]:
    """Call `listener(snapshot)` on every progress change of runs in this process (from the
    flow thread or the engine thread: keep it cheap and thread-safe)."""
    with _LOCK:
        _LISTENERS.append(listener)
    try:
        yield
    finally:
        with _LOCK:
            _LISTENERS.remove(listener)


def _notify(tracker: Tracker) -> None:
    with _NOTIFY_LOCK:  # snapshot and delivery together: listeners see counts in order
        snap = tracker.snapshot()
        for listener in _LISTENERS:
            try:
                listener(snap)
            except Exception:  # a display must never fail the run
                pass


def prompt_done(run_id: str, method: str, batch: str, done_in_attempt: int) -> None:
    """The engine's progress hook for a batch of `run_id` (toa.engine.run_batch `on_prompt`)."""
    tracker = _TRACKERS.get(run_id)
    if tracker is not None and tracker.prompt_done((method, batch), done_in_attempt):
        _notify(tracker)


class RunProgress:
    """The flow's view: a progress artifact `toa-progress-<run_id>` updated as batches finish,
    an event `toa.batch.completed` / `toa.batch.failed` per batch, and the in-process listeners."""

    def __init__(self, run_id: str, units: list[tuple[str, Any]]):
        self.run_id = run_id
        self.tracker = Tracker({(m, b.key): b.size for m, b in units})
        with _LOCK:
            _TRACKERS[run_id] = self.tracker
        self.artifact_id = _create_artifact(run_id, self.tracker.snapshot())
        _notify(self.tracker)

    def finished(self, method: str, batch: str, stats: Any | None, error: str | None = None) -> Snapshot:
        """Record a finished batch: `stats` (toa.units.BatchStats) when it completed, else the error."""
        unit = (method, batch)
        if stats is not None:
            self.tracker.finish(unit, stats.prompts, skipped=stats.skipped,
                                cost=getattr(stats, "cost", None), currency=getattr(stats, "currency", None))
        else:
            self.tracker.finish(unit, 0, failed=True)
        snap = self.tracker.snapshot()
        _update_artifact(self.artifact_id, self.run_id, snap)
        _emit_batch_event(self.run_id, method, batch, stats, error, snap)
        _notify(self.tracker)
        return snap

    def close(self) -> None:
        with _LOCK:
            if _TRACKERS.get(self.run_id) is self.tracker:
                del _TRACKERS[self.run_id]


def _create_artifact(run_id: str, snap: Snapshot):
    from prefect.artifacts import create_progress_artifact

    return create_progress_artifact(snap.percent, key=f"toa-progress-{run_id}", description=describe(run_id, snap))


def _update_artifact(artifact_id, run_id: str, snap: Snapshot) -> None:
    from prefect.artifacts import update_progress_artifact

    update_progress_artifact(artifact_id, snap.percent, description=describe(run_id, snap))


def batch_resource(run_id: str, method: str, batch: str) -> dict[str, str]:
    return {"prefect.resource.id": f"toa.batch.{run_id}.{method}.{batch}",
            "prefect.resource.name": f"{method}/{batch}",
            "toa.run_id": run_id, "toa.method": method, "toa.batch": batch}


def _emit_batch_event(run_id: str, method: str, batch: str, stats: Any | None, error: str | None, snap: Snapshot) -> None:
    from prefect.context import FlowRunContext
    from prefect.events import emit_event

    payload: dict[str, Any] = {"run": {"prompts_done": snap.done, "prompts_total": snap.total,
                                       "batches_done": snap.batches_done, "batches_total": snap.batches_total,
                                       "eta_s": snap.eta_s, "cost": snap.cost, "projected_cost": snap.projected_cost,
                                       "currency": snap.currency}}
    if stats is not None:
        payload["batch"] = asdict(stats)
    if error is not None:
        payload["error"] = error[:2000]
    ctx = FlowRunContext.get()
    related = ([{"prefect.resource.id": f"prefect.flow-run.{ctx.flow_run.id}", "prefect.resource.role": "flow-run"}]
               if ctx is not None and ctx.flow_run is not None else None)
    emit_event(event=f"toa.batch.{'failed' if stats is None else 'completed'}",
               resource=batch_resource(run_id, method, batch), related=related, payload=payload)
