"""Servers and engines belong to a run: two flow runs in one worker process (threads) each stop
only their own servers. Real Prefect API, real flow runs, real server processes (the fake vLLM
of tests/fake_vllm.py, launched through start_endpoints as a run launches vLLM)."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import httpx
import pytest
from prefect import flow
from prefect.runtime import flow_run
from toa.tasks.servers import start_endpoints, stop_servers

from toa.config import load_config

pytestmark = pytest.mark.integration


def _fake_vllm_python(tmp_path: Path) -> str:
    path = tmp_path / "fake-python"
    path.write_text(f'#!/bin/sh\nexec {sys.executable} {Path(__file__).with_name("fake_vllm.py")} "$@"\n')
    path.chmod(0o755)
    return str(path)


def _alive(url: str) -> bool:
    try:
        return httpx.get(url.removesuffix("/v1") + "/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@flow(name="hold-servers", validate_parameters=False)  # `started` and `release` are shared, not copied
def hold_servers(results_root: str, python: str, started: dict, release: threading.Event) -> str:
    """Start one server as a run does, hold it until released, stop this run's servers."""
    cfg = load_config(overrides={"results_root": results_root,
                                 "agents": [{"alias": "a", "launch": {"model": "m", "device": "cpu", "python": python}}]})
    owner = flow_run.id
    try:
        started[owner] = start_endpoints(cfg, owner)["a"].base_url
        release.wait(120)
    finally:
        stop_servers(owner)
    return owner


def test_two_flow_runs_in_one_process_stop_only_their_own_servers(prefect_api, tmp_path):
    python = _fake_vllm_python(tmp_path)
    started: dict[str, str] = {}
    release_a, release_b = threading.Event(), threading.Event()
    owners: dict[str, str] = {}
    runs = [threading.Thread(target=lambda k=k, ev=ev: owners.__setitem__(k, hold_servers(str(tmp_path / k), python, started, ev)))
            for k, ev in (("a", release_a), ("b", release_b))]
    for t in runs:
        t.start()
    try:
        for _ in range(600):  # poll with a deadline: both servers up
            if len(started) == 2:
                break
            runs[0].join(0.2)
        assert len(started) == 2, "both runs should have started their server"
        url_a_b = dict(started)
        release_a.set()
        runs[0].join(60)
        url_a = url_a_b[owners["a"]]
        url_b = next(u for o, u in url_a_b.items() if o != owners["a"])
        assert not _alive(url_a), "run a's server should be stopped"
        assert _alive(url_b), "run a's end must not stop run b's server"
    finally:
        release_a.set()
        release_b.set()
        for t in runs:
            t.join(60)
    assert not _alive(url_b)
