"""Asking a run to stop (Ctrl-C, SIGTERM, a cancelled flow run) and the parts that listen.

A stop is a process-wide fact, as the signal that causes it is: `request(reason)` sets it once
and calls every registered listener (the engine cancels the model calls in flight, a server
still starting gives up). Work that is asked to start afterwards raises `Stopped` instead.
Nothing finished is lost: a batch flushes its call and reward records before it ends.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

_event = threading.Event()
_reason: list[str] = []
_listeners: list[Callable[[], None]] = []
_lock = threading.Lock()


class Stopped(RuntimeError):
    """Work refused or interrupted because the run was asked to stop."""


def request(reason: str) -> None:
    """Ask the run to stop; the first reason is kept. Listeners run in the caller's thread."""
    with _lock:
        if _event.is_set():
            return
        _reason.append(reason)
        _event.set()
        listeners = list(_listeners)
    for listener in listeners:
        try:
            listener()
        except Exception:  # one listener's failure must not keep the others from stopping
            pass


def requested() -> bool:
    return _event.is_set()


def reason() -> str | None:
    return _reason[0] if _reason else None


def check(what: str) -> None:
    """Raise `Stopped` if a stop was requested, before starting `what`."""
    if _event.is_set():
        raise Stopped(f"{what}: not started, the run is stopping ({reason()})")


def on_stop(listener: Callable[[], None]) -> Callable[[], None]:
    """Call `listener()` when a stop is requested (at once if it already was). Returns a
    function that removes it."""
    with _lock:
        _listeners.append(listener)
        already = _event.is_set()
    if already:
        listener()

    def remove() -> None:
        with _lock:
            if listener in _listeners:
                _listeners.remove(listener)
    return remove


def reset() -> None:
    """Forget a stop (tests; a long-lived worker process between flow runs)."""
    with _lock:
        _event.clear()
        _reason.clear()
