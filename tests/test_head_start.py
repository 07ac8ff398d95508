"""The head start of `toa run` on attached servers (toa.head_start, toa.engine.start_ahead): the
first unit samples before the flow exists, the flow adopts it, and nothing is asked twice.

The unit tests drive the engine in-process against tests/openai_double.py (a real HTTP server in
a thread); the integration tests run `toa run` as a user does and stop it while only the head
start is sampling.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
from helpers import wait_until
from openai_double import OpenAIDouble
from test_stopping import (
    CALLS,
    GUARD_MARK,
    KEY,
    processes,
    recorded_calls,
    rerun_makes_only_the_missing_calls,
    slow_run_file,
    toa_run,
)

from toa import engine, stopping
from toa.config import load_config
from toa.head_start import begin, eligible
from toa.plan import plan_run
from toa.prompts import iter_prompts
from toa.servers.attach import attach
from toa.servers.process import group_alive


def attached_config(tmp_path, double: OpenAIDouble, mode: str = "ok", **more):
    overrides = {"results_root": str(tmp_path / "results"), "methods": ["random"], "n": 2, "batch_size": 4,
                 "prompts": {"limit": 4}, "reward": {"kind": "custom", "function": "openai_double:length"},
                 "agents": [{"alias": "a", "max_concurrency": 1,
                             "endpoint": {"base_url": double.url(mode), "model": "m", "api_key": KEY}}], **more}
    return load_config(None, overrides)


def unit_of(cfg):
    plan = plan_run(cfg)
    prompts = [p for p in iter_prompts(cfg.prompts)][: cfg.batch_size]
    return plan, {a.alias: attach(a.alias, a.endpoint) for a in cfg.agents}, prompts


def test_the_flow_adopts_the_head_start_and_its_engine(tmp_path):
    with OpenAIDouble(KEY) as double:
        plan, endpoints, prompts = unit_of(attached_config(tmp_path, double))
        engine.start_ahead(plan, endpoints, "random", "b1", prompts)
        assert engine.started_ahead(plan.run_id, "random", "b1")
        try:
            stats = engine.run_batch(plan, endpoints, "random", "b1", prompts, owner="flow")
            # the flow's engine for the same config and endpoints is the head start's: one limit per endpoint
            assert engine.get_engine(plan.cfg, endpoints, "flow") is not None
            assert not engine._engines_of(engine.HEAD_START)
        finally:
            engine.end_head_start()
            engine.close_engines("flow")
    assert not engine.started_ahead(plan.run_id, "random", "b1")
    assert stats.calls_made == stats.samples == 8 and not stats.skipped  # counted as this run's new calls
    made = sum(body.get("n", 1) for _, _, body in double.requests)
    assert made == 8  # asked once: run_batch waited for the head start instead of sampling again


def test_an_unadopted_head_start_is_cancelled_and_keeps_its_finished_calls(tmp_path):
    with OpenAIDouble(KEY, slow_s=0.3) as double:
        plan, endpoints, prompts = unit_of(attached_config(tmp_path, double, "slow"))
        engine.start_ahead(plan, endpoints, "random", "b1", prompts)
        wait_until(lambda: len(double.requests) >= 2, 30, "the head start's first requests")
        engine.end_head_start()  # the flow failed before sampling: nothing may keep running
        answered = len(double.requests)
    assert not engine._engines_of(engine.HEAD_START) and not engine.started_ahead(plan.run_id, "random", "b1")
    assert not [t for t in threading.enumerate() if t.name == "toa-head-start"]
    assert 1 <= recorded_calls(tmp_path / "results") <= min(answered, 7)  # finished calls are journaled


def test_begin_starts_the_first_unfinished_unit_only_where_nothing_comes_from_prefect(tmp_path):
    with OpenAIDouble(KEY) as double:
        cfg = attached_config(tmp_path, double)
        assert eligible(cfg) and not eligible(cfg.model_copy(update={"head_start": False}))
        assert not eligible(cfg.model_copy(update={"task_runner": cfg.task_runner.model_copy(update={"kind": "dask"})}))
        limited = attached_config(tmp_path, double, agents=[{"alias": "a", "global_limit": {"name": "shared", "concurrency": 2},
                                                            "endpoint": {"base_url": double.url("ok"), "model": "m", "api_key": KEY}}])
        assert not eligible(limited)  # global limits live in the Prefect API
        assert begin(attached_config(tmp_path, double, agents=[{"alias": "a", "endpoint": {
            "base_url": double.url("ok"), "model": "m", "api_key": "wrong"}}])) is None  # the flow reports the key
        unit = begin(cfg)
        try:
            assert unit is not None and unit.startswith("random/")
            wait_until(lambda: len(double.requests) >= 4, 30, "the head start's requests")
        finally:
            engine.end_head_start()


@pytest.mark.integration
def test_ctrl_c_while_only_the_head_start_samples_stops_everything_and_a_rerun_finishes(tmp_path):
    """The signal comes before the flow has begun (Prefect is still starting): the run still
    stops in order (exit 130, nothing left running) and loses no finished call."""
    guards_before = set(processes(GUARD_MARK))
    with OpenAIDouble(KEY, slow_s=0.5) as double:
        run_file = slow_run_file(tmp_path, double, "slow")
        root = tmp_path / "results"
        started = time.monotonic()
        proc = toa_run(run_file)
        wait_until(lambda: len(double.requests) >= 1, 60, "the head start's first request", proc)
        first_request = double.requests[0][1] - started
        os.killpg(proc.pid, signal.SIGINT)
        out = proc.communicate(timeout=30)[0].decode()
        assert proc.returncode == 130, out[-3000:]
        assert "Beginning flow run" not in out, "the flow began before the signal: not a head-start stop"
        assert "resumes the run" in out and "Traceback" not in out, out[-3000:]
        assert not group_alive(proc.pid)
        wait_until(lambda: not set(processes(GUARD_MARK)) - guards_before, 10, "the Prefect API to be stopped")
        kept = recorded_calls(root)
        assert kept < CALLS
        rerun_makes_only_the_missing_calls(run_file, root, double, kept)
    print(f"first request {first_request:.2f} s after `toa run` started")


@pytest.mark.integration
def test_an_attached_run_samples_its_head_start_once_and_counts_it_as_new(tmp_path):
    with OpenAIDouble(KEY) as double:
        proc = toa_run(slow_run_file(tmp_path, double, "ok"))
        out = proc.communicate(timeout=300)[0].decode()
    assert proc.returncode == 0, out[-3000:]
    assert "began before the flow (head start)" in out, out[-3000:]
    assert sum(body.get("n", 1) for _, _, body in double.requests) == CALLS  # nothing asked twice
    rows = [line.split() for line in out.splitlines() if line.startswith(("random ", "parallel_ensemble "))]
    assert sum(int(r[6]) for r in rows) == CALLS and all(r[7] == "0" for r in rows), out  # new calls, none replayed
    assert not stopping.requested()
