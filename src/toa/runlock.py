"""One process at a time per run: a lock held for the life of a run's work (docs/design.md §4.2,
§4.4), so that two `toa run` on the same config and results root (a cron run overlapping a
manual one) never sample the same units at once. The second one says who holds the run, waits,
and then continues, usually finding every unit done (the rerun shortcut).

Where the lock lives:
- a local results root: an flock on `<root>/runs/run=<id>/run.lock`, beside the run's records. A
  shared disk (NFS v4, which Linux maps flock onto) extends it to every machine that mounts it;
- an object-store root (s3://, gs://, ...): object stores have no locks, so it is a local flock on
  `${TOA_HOME:-~/.cache/toa}/locks/<hash of root URL and run id>.lock`. It protects against a
  second run on the same machine only; runs started on different machines are not kept apart.

The kernel releases an flock when its process dies (even by SIGKILL), so a lock is never stale.
The holder writes "host:pid" and its start time into the file for the waiter's message.

Re-entrant within a process: `toa run` takes the lock before its head start samples, and the
flow it then runs takes it again (a deployment run has only the flow's). Waiting is stoppable:
a stop request (toa.stopping: Ctrl-C or SIGTERM of `toa run`) ends the wait with `Stopped`.
Plain Python, no Prefect.
"""

from __future__ import annotations

import hashlib
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from toa import stopping
from toa.storage import toa_home

try:
    import fcntl
except ImportError:  # pragma: no cover -- not POSIX: no lock (the journals have none there either)
    fcntl = None

POLL_S = 0.2  # how often a waiter tries the lock again (a waiter costs one syscall per poll)

# lock file path -> [open file holding the flock, how many holds in this process]
_HELD: dict[str, list[Any]] = {}
_HELD_LOCK = threading.Lock()


def lock_path(results_root: str, storage_options: dict[str, Any] | None, *parts: str) -> Path:
    """The lock file for `parts` (e.g. ("runs", "run=<id>", "run.lock")) of a results root: inside
    a local root, else under TOA_HOME/locks named by a hash of the root URL and `parts`."""
    from toa.storage import Store

    store = Store(results_root, storage_options)
    if store.local:
        return Path(store.path(*parts))
    name = hashlib.sha256("\0".join([results_root.rstrip("/"), *parts]).encode()).hexdigest()[:32]
    return toa_home() / "locks" / f"{name}.lock"


def run_lock_path(results_root: str, storage_options: dict[str, Any] | None, run_id: str) -> Path:
    return lock_path(results_root, storage_options, "runs", f"run={run_id}", "run.lock")


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


@contextmanager
def hold_run(results_root: str, storage_options: dict[str, Any] | None, run_id: str,
             say: Callable[[str], None] = _say) -> Iterator[bool]:
    """Hold run `run_id`'s lock for the body; yields True when it had to wait for another
    process (whose work the caller should now find done). `say` gets the one waiting message."""
    with hold(run_lock_path(results_root, storage_options, run_id), f"run {run_id}", say) as waited:
        yield waited


@contextmanager
def hold(path: Path, what: str, say: Callable[[str], None] = _say) -> Iterator[bool]:
    """Hold the flock on `path` for the body (re-entrant in this process); yields whether it waited."""
    if fcntl is None:
        yield False
        return
    waited = _acquire(path, what, say)
    try:
        yield waited
    finally:
        _release(path)


def _acquire(path: Path, what: str, say: Callable[[str], None]) -> bool:
    key = str(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = open(path, "a+", encoding="utf-8")  # noqa: SIM115 -- held open as long as the lock is held
    told, waited = False, False
    woken = threading.Event()
    forget = stopping.on_stop(woken.set)  # a stop ends the wait at once, not at the next poll
    try:
        while True:
            with _HELD_LOCK:
                if key in _HELD:  # this process holds it already (the CLI, then its flow)
                    _HELD[key][1] += 1
                    fh.close()
                    return waited
                if _try_flock(fh):
                    _HELD[key] = [fh, 1]
                    _write_holder(fh)
                    return waited
            stopping.check(f"waiting for {what}")
            waited = True
            if not told:
                told = _tell_holder(fh, what, say)
            woken.wait(POLL_S)
    except BaseException:
        fh.close()
        raise
    finally:
        forget()


def _try_flock(fh) -> bool:
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _write_holder(fh) -> None:
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime())
    fh.seek(0)
    fh.truncate()
    fh.write(f"{socket.gethostname()}:{os.getpid()} {started}\n")
    fh.flush()


def _tell_holder(fh, what: str, say: Callable[[str], None]) -> bool:
    """Say once who holds it; False while the holder has not written its name yet (it does so
    right after taking the lock), so the next poll tries again."""
    fh.seek(0)
    holder, _, started = fh.read().strip().partition(" ")
    if not holder:
        return False
    say(f"{what} is being run by {holder} (started {started}); waiting for it")
    return True


def _release(path: Path) -> None:
    key = str(path)
    with _HELD_LOCK:
        entry = _HELD[key]
        entry[1] -= 1
        if entry[1] > 0:
            return
        del _HELD[key]
    fh = entry[0]
    fh.seek(0)
    fh.truncate()  # nobody holds it now: a waiter must not name a process that is gone
    fh.flush()
    fcntl.flock(fh, fcntl.LOCK_UN)
    fh.close()
