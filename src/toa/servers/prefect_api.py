"""A temporary Prefect API for one `toa run` when none is configured (no PREFECT_API_URL).

Prefect would start one itself (its "ephemeral" server), but as a plain child in toa's process
group: a Ctrl-C at the terminal then kills the API while the run still needs it to record its
final states, and a killed toa leaves it running. This starts the same server (uvicorn on
Prefect's app factory, UI off, loopback) through toa.servers.process: its own process group,
under the guard, stopped when the run ends.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx

from toa import stopping
from toa.servers.process import spawn, stop_group
from toa.servers.vllm import free_port, log_tail

STARTUP_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 3.0


class PrefectApiError(RuntimeError):
    pass


@contextlib.contextmanager
def temporary_api(log_dir: Path, meanwhile: Callable[[], None] = lambda: None) -> Iterator[str | None]:
    """Point this thread's Prefect settings at a temporary API for the duration (yields its
    URL), or do nothing when an API is configured (yields None). Run work in other threads with
    `contextvars.copy_context()` taken inside, so they see the same settings. `meanwhile()` runs
    while the API starts (e.g. imports the flow: seconds of CPU that need not wait for it)."""
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    if get_current_settings().api.url:
        meanwhile()
        yield None
        return
    log_dir.mkdir(parents=True, exist_ok=True)
    proc, url = _start(log_dir / "prefect-api.log", meanwhile)
    try:
        with temporary_settings(updates={PREFECT_API_URL: url}):
            try:
                yield url
            finally:
                _drain_prefect_workers()
    finally:
        stop_group(proc, STOP_TIMEOUT_S)


def _drain_prefect_workers() -> None:
    """Send the logs and events still queued in this process while the API is up (Prefect
    would try at interpreter exit, when the temporary API is gone)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        worker.drain_all(timeout=STOP_TIMEOUT_S)


def _start(log_path: Path, meanwhile: Callable[[], None]) -> tuple[subprocess.Popen, str]:
    import prefect
    from prefect.settings import get_current_settings

    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    cmd = [sys.executable, "-m", "uvicorn", "--app-dir", str(Path(prefect.__file__).parent.parent),
           "--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port),
           "--log-level", "error", "--lifespan", "on"]
    # What Prefect's own ephemeral server gets: no UI, the ephemeral database set-up.
    env = {**os.environ, **get_current_settings().to_environment_variables(exclude_unset=True),
           "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
    with open(log_path, "ab") as log:
        proc = spawn(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        meanwhile()
    except BaseException:
        stop_group(proc, STOP_TIMEOUT_S)
        raise
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    with httpx.Client(timeout=2.0, trust_env=False) as client:
        while True:
            if proc.poll() is not None:
                raise PrefectApiError(f"the temporary Prefect API exited with code {proc.returncode}; "
                                      f"log {log_path}:\n{log_tail(log_path, 30)}")
            with contextlib.suppress(httpx.HTTPError):
                if client.get(f"{url}/health").status_code == 200:
                    return proc, url
            if stopping.requested():  # Ctrl-C while it starts (a head start may be sampling already)
                stop_group(proc, STOP_TIMEOUT_S)
                stopping.check("the temporary Prefect API")
            if time.monotonic() > deadline:
                stop_group(proc, STOP_TIMEOUT_S)
                raise PrefectApiError(f"the temporary Prefect API did not answer within {STARTUP_TIMEOUT_S:.0f} s; "
                                      f"log {log_path}:\n{log_tail(log_path, 30)}")
            time.sleep(0.1)
