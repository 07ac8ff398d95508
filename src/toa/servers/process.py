"""Child processes toa owns (model servers, the temporary Prefect API): started in their own
process group under a guard (toa/servers/guard.py) that ends them if toa is killed, registered
so that an emergency exit can end them all, and stopped group-wide.

Why a group of its own: a Ctrl-C at the terminal goes to the terminal's foreground process
group; servers outside it keep serving while toa drains its work and then stops them in order.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

GUARD = str(Path(__file__).with_name("guard.py"))

_LIVE: set[subprocess.Popen] = set()
_LIVE_LOCK = threading.Lock()


def spawn(cmd: list[str], **popen_kwargs) -> subprocess.Popen:
    """Start `cmd` under the guard in a new session (own process group); the returned Popen is
    the guard, whose exit status is the command's. Registered until `stop_group`."""
    guarded = [sys.executable, GUARD, str(os.getpid()), "--", *cmd]
    proc = subprocess.Popen(guarded, start_new_session=True, **popen_kwargs)
    with _LIVE_LOCK:
        _LIVE.add(proc)
    return proc


def stop_group(proc: subprocess.Popen, timeout_s: float) -> None:
    """SIGTERM the group, wait for it to empty, then SIGKILL whatever is left."""
    pgid = proc.pid  # start_new_session=True made the guard its group's leader
    signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    while group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if group_alive(pgid) or proc.poll() is None:
        signal_group(pgid, signal.SIGKILL)
        proc.wait()
        kill_deadline = time.monotonic() + 10
        while group_alive(pgid) and time.monotonic() < kill_deadline:
            time.sleep(0.1)
    with _LIVE_LOCK:
        _LIVE.discard(proc)


def kill_all() -> None:
    """Emergency exit (a second Ctrl-C, a stop past its deadline): SIGKILL every group toa
    started and has not stopped yet, without waiting."""
    with _LIVE_LOCK:
        live = list(_LIVE)
        _LIVE.clear()
    for proc in live:
        signal_group(proc.pid, signal.SIGKILL)


def signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def group_alive(pgid: int) -> bool:
    """Whether any live (non-zombie) process is in group `pgid`. /proc is read because orphaned
    zombies may linger where PID 1 does not reap, and kill(0) counts them as alive."""
    proc_root = Path("/proc")
    if not proc_root.is_dir():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        return True
    for entry in proc_root.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Fields after the ")" closing the command name: state ppid pgrp ...
        fields = stat[stat.rfind(")") + 2:].split()
        if len(fields) > 2 and fields[0] != "Z" and int(fields[2]) == pgid:
            return True
    return False
