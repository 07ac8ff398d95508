"""Run a command and end it when the process that started it dies: `python guard.py <pid> -- cmd...`.

toa starts its servers (vLLM, the temporary Prefect API) in their own process group, so that a
Ctrl-C at the terminal does not hit them before toa has drained its work, and so that stopping
one stops everything it forked. The price is that a killed orchestrator (SIGKILL, OOM killer)
leaves them running. A parent-death signal (PR_SET_PDEATHSIG) does not help: it fires when the
starting *thread* exits, and toa starts servers from short-lived worker threads. So this small
guard sits between toa and the server, in the server's group, and polls its parent: when toa is
gone (the guard is re-parented), it sends SIGTERM to its group, then SIGKILL after a grace.

It is executed by path and imports nothing from toa, so it starts in a few milliseconds and
never loads the orchestrator's dependencies. Its exit status is the command's.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

POLL_S = 0.2
GRACE_S = 5.0


def main(argv: list[str]) -> int:
    parent, sep, *cmd = argv
    if sep != "--" or not cmd:
        print("usage: guard.py <parent pid> -- command ...", file=sys.stderr)
        return 2
    parent_pid = int(parent)
    if os.getppid() != parent_pid:  # the orchestrator died before we even started
        return 1
    # A SIGTERM or SIGINT for the group reaches the command directly; the guard only waits for it.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    child = subprocess.Popen(cmd, preexec_fn=_default_signals)
    while child.poll() is None:
        if os.getppid() != parent_pid:
            return _end_group(child)
        time.sleep(POLL_S)
    return child.returncode


def _default_signals() -> None:
    # the command must not inherit the guard's ignored signals
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)


def _end_group(child: subprocess.Popen) -> int:
    group = os.getpgrp()
    os.killpg(group, signal.SIGTERM)  # the guard ignores it
    deadline = time.monotonic() + GRACE_S
    while child.poll() is None and time.monotonic() < deadline:
        time.sleep(POLL_S)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.killpg(group, signal.SIGKILL)  # whatever is left, the guard included
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
