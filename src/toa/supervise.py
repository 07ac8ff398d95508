"""Run a long job (a flow) in a worker thread while the main thread owns Ctrl-C and SIGTERM.

Why a thread: Python delivers signals to the main thread only. With the job there, a Ctrl-C is
a KeyboardInterrupt raised wherever the job happens to be (inside Prefect's client, inside a
cleanup), and Prefect replaces the SIGTERM handler with its own during a flow. Here the main
thread only waits, so a signal becomes an orderly stop:

- the first SIGINT or SIGTERM asks the job to stop (toa.stopping.request: running batches cancel
  their calls in flight and flush what finished, servers are stopped) and gives it `grace_s`;
- a second signal, or the grace running out, ends the process at once: every server toa
  started is killed (toa.servers.process.kill_all) and the process exits;
- the exit status is 128 + the signal number (130 for Ctrl-C, 143 for SIGTERM).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from toa import stopping
from toa.servers.process import kill_all

GRACE_S = 10.0  # the job's share of the 15 s a stop may take; the rest is for the Prefect API
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Exception):
    """The job was stopped by a signal and ended in time; `code` is the exit status to use."""

    def __init__(self, signum: int):
        self.signum, self.code = signum, 128 + signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")


def run_stoppable(job: Callable[[], Any], grace_s: float = GRACE_S,
                  say: Callable[[str], None] = lambda text: print(text, file=sys.stderr, flush=True)) -> Any:
    """job() in a worker thread; returns its result, raises its exception, or raises
    Interrupted once a signal stopped it."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = job()
        except BaseException as exc:  # handed to the main thread as is
            box["error"] = exc

    received: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: received.append(signum)) for sig in SIGNALS}
    worker = threading.Thread(target=target, name="toa-job", daemon=True)
    try:
        worker.start()
        _wait(worker, received, grace_s, say)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if received:
        raise Interrupted(received[0])
    if "error" in box:
        raise box["error"]
    return box.get("result")


def _wait(worker: threading.Thread, received: list[int], grace_s: float, say) -> None:
    deadline = None
    while worker.is_alive():
        worker.join(0.1)
        if received and deadline is None:
            name = signal.Signals(received[0]).name
            say(f"\n{name}: stopping (finishing nothing new, keeping what is done); "
                f"press Ctrl-C again to exit at once")
            stopping.request(f"{name} received")
            deadline = time.monotonic() + grace_s
        if len(received) > 1:
            _exit_now(received[0], say, "second signal: exiting at once")
        if deadline is not None and time.monotonic() > deadline and worker.is_alive():
            _exit_now(received[0], say, f"still stopping after {grace_s:.0f} s: exiting at once")


def _exit_now(signum: int, say, why: str) -> None:
    """Kill what toa started and leave without waiting for threads (os._exit skips them)."""
    say(why)
    kill_all()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(128 + signum)
