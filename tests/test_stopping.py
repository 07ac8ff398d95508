"""Stopping is a feature (docs/design.md §5): Ctrl-C and SIGTERM on a real `toa run`, SIGKILL of
the orchestrator with a real launched vLLM server, and the stall watchdog.

The Ctrl-C and SIGTERM tests run `toa run` as a user does: its own process group (a terminal's
Ctrl-C goes to the whole foreground group), no PREFECT_API_URL (so toa starts its temporary
Prefect API), attached to a slow OpenAI-compatible stub (tests/openai_double.py) serving
requests one at a time so that the run is mid-way when the signal comes. They check the exit
status and time, that nothing toa started is left running, that finished calls were kept, and
that a rerun finishes without repeating them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import polars as pl
import pytest
from helpers import launched_run_file, wait_until
from openai_double import OpenAIDouble

from toa.db import query
from toa.servers.process import group_alive
from toa.storage import Store

KEY = "sk-double-key"
# 8 prompts, n=2, 2 agents: random asks the first agent for 4 samples per prompt, parallel_ensemble
# 2 from each: 64 sampled calls (records), made as 8 + 16 requests.
CALLS = 8 * 4 * 2
GUARD_MARK = "toa/servers/guard.py"


def processes(word: str) -> dict[int, str]:
    """Live processes whose command line contains `word`: {pid: command line}."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if word in cmd and state != "Z":
            found[int(entry.name)] = cmd
    return found


def recorded_calls(root: Path) -> int:
    """Finished calls on disk: shard rows plus journal lines (what a kill cannot take away)."""
    rows = sum(pl.read_parquet(f).height for f in (root / "calls").rglob("part-*.parquet"))
    lines = sum(len(f.read_text().splitlines()) for f in (root / "calls").rglob("journal-*.jsonl"))
    return rows + lines


def slow_run_file(tmp_path: Path, double: OpenAIDouble, mode: str) -> Path:
    root = tmp_path / "results"
    lines = [f"results_root = {json.dumps(str(root))}", 'methods = ["random", "parallel_ensemble"]', "n = 2",
             "batch_size = 4", "[prompts]", "limit = 8", "[reward]", 'kind = "custom"',
             'function = "openai_double:length"']
    for alias in ("a", "b"):
        lines += ["[[agents]]", f'alias = "{alias}"', "max_concurrency = 1", "[agents.endpoint]",
                  f'base_url = "{double.url(mode)}"', 'model = "m"', f'api_key = "{KEY}"',
                  "[agents.sampling]", "max_tokens = 8"]
    path = tmp_path / "run.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def toa_run(run_file: Path) -> subprocess.Popen:
    """`toa run` as from a terminal: its own process group, no Prefect API configured."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PYTHONPATH"] = str(Path(__file__).parent)  # the stub's reward function
    return subprocess.Popen([sys.executable, "-m", "toa.cli", "run", "--config", str(run_file)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def start_mid_run(tmp_path: Path, double: OpenAIDouble) -> tuple[subprocess.Popen, Path, Path]:
    """A `toa run` on the slow stub, once its first calls are recorded: (process, run file, root)."""
    run_file = slow_run_file(tmp_path, double, "slow")
    root = tmp_path / "results"
    proc = toa_run(run_file)
    wait_until(lambda: (root / "calls").exists() and recorded_calls(root) >= 3, 180, "the first calls", proc)
    return proc, run_file, root


def rerun_makes_only_the_missing_calls(run_file: Path, root: Path, double: OpenAIDouble, kept: int) -> None:
    double.healed = True  # answers at once now
    seen = len(double.requests)
    rerun = toa_run(run_file)
    out = rerun.communicate(timeout=300)[0].decode()
    assert rerun.returncode == 0, out[-3000:]
    made = sum(body.get("n", 1) for _, _, body in double.requests[seen:])
    assert made == CALLS - kept  # the kept calls were replayed, none made again
    attempts = query(Store(str(root)), "select count(*) as n, count(distinct call_key) as k from call_attempts")
    assert attempts.rows() == [(CALLS, CALLS)]


@pytest.mark.integration
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_stops_the_run_in_time_leaves_nothing_and_a_rerun_finishes(tmp_path, sig, code):
    guards_before = set(processes(GUARD_MARK))
    with OpenAIDouble(KEY, slow_s=0.5) as double:
        proc, run_file, root = start_mid_run(tmp_path, double)
        # Ctrl-C reaches the whole foreground group; SIGTERM is what `kill <pid>` or a supervisor sends.
        os.killpg(proc.pid, sig) if sig == signal.SIGINT else os.kill(proc.pid, sig)
        sent = time.monotonic()
        out = proc.communicate(timeout=30)[0].decode()
        took = time.monotonic() - sent
        assert proc.returncode == code, out[-3000:]
        assert took < 15, f"stopping took {took:.1f} s"
        assert "resumes the run" in out and "Traceback" not in out, out[-3000:]
        assert not group_alive(proc.pid), "a process of toa's group outlived it"
        assert not set(processes(GUARD_MARK)) - guards_before, "a server toa started (the Prefect API) is still running"
        kept = recorded_calls(root)
        assert 3 <= kept < CALLS, kept
        rerun_makes_only_the_missing_calls(run_file, root, double, kept)


@pytest.mark.integration
def test_a_second_ctrl_c_exits_at_once_and_loses_no_finished_call(tmp_path):
    guards_before = set(processes(GUARD_MARK))
    with OpenAIDouble(KEY, slow_s=0.5) as double:
        proc, run_file, root = start_mid_run(tmp_path, double)
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(line.decode() for line in proc.stdout), daemon=True)
        reader.start()
        os.killpg(proc.pid, signal.SIGINT)
        # A second SIGINT sent before the first is handled would merge with it (signals do not queue).
        wait_until(lambda: any("SIGINT: stopping" in line for line in lines), 10, "the first stop to begin")
        os.killpg(proc.pid, signal.SIGINT)
        sent = time.monotonic()
        proc.wait(timeout=30)
        reader.join(timeout=10)
        out = "".join(lines)
        assert proc.returncode == 130, out[-3000:]
        assert time.monotonic() - sent < 5 and "exiting at once" in out
        assert not group_alive(proc.pid)
        wait_until(lambda: not set(processes(GUARD_MARK)) - guards_before, 10, "the Prefect API to be killed")
        rerun_makes_only_the_missing_calls(run_file, root, double, recorded_calls(root))  # journals survive


@pytest.mark.integration
def test_rerun_of_a_finished_run_starts_nothing_and_prints_its_result(tmp_path):
    """`toa run` on a finished run answers from its recorded result: no Prefect API, no server,
    no model call (cli._finished_run), the same summary with every sample replayed."""
    guards_before = set(processes(GUARD_MARK))
    with OpenAIDouble(KEY) as double:
        run_file = slow_run_file(tmp_path, double, "ok")
        first = toa_run(run_file)
        out = first.communicate(timeout=300)[0].decode()
        assert first.returncode == 0, out[-3000:]
        api_log = tmp_path / "results" / "logs" / "prefect-api.log"
        api_log_size, seen = api_log.stat().st_size, len(double.requests)
        rerun = toa_run(run_file)
        again = rerun.communicate(timeout=120)[0].decode()
    assert rerun.returncode == 0, again[-3000:]
    assert "is complete: every (method, batch) unit is done" in again, again[-3000:]
    assert len(double.requests) == seen  # no model call
    assert api_log.stat().st_size == api_log_size  # no temporary Prefect API was started
    assert not set(processes(GUARD_MARK)) - guards_before
    run_line = next(line for line in out.splitlines() if line.startswith("run "))
    assert run_line in again.splitlines()  # the same run id
    replayed = [line.split() for line in again.splitlines() if line.startswith(("random ", "parallel_ensemble "))]
    assert len(replayed) == 2 and all(row[6] == "0" for row in replayed), again  # new calls: 0


@pytest.mark.integration
def test_sigkill_of_the_orchestrator_ends_the_servers_it_launched(tmp_path):
    alias = "sigkill-smollm2"
    guards_before = set(processes(GUARD_MARK))
    run_file, root = launched_run_file(tmp_path, alias)
    proc = toa_run(run_file)
    log = root / "logs" / f"{alias}.vllm.log"
    wait_until(lambda: log.exists() and "Application startup complete" in log.read_text(errors="replace"),
               300, "the vLLM server to start", proc)
    servers = processes(f"--served-model-name {alias}")
    assert servers, "no vLLM server process found"
    proc.send_signal(signal.SIGKILL)  # the orchestrator only: nothing of it can clean up
    proc.wait()
    gone = time.monotonic()
    wait_until(lambda: not processes(f"--served-model-name {alias}"), 10, "the vLLM server to exit")
    wait_until(lambda: not set(processes(GUARD_MARK)) - guards_before, 10, "the guards (and the Prefect API) to exit")
    assert time.monotonic() - gone < 10


def test_a_stalled_server_fails_its_calls_fast_with_what_it_reported(tmp_path):
    """A server that takes requests and never answers, while its metrics say they are running:
    the calls fail after the stall limit, not after timeout x retries, as error rows."""
    from toa.config import load_config
    from toa.db import query
    from toa.engine import close_engines, run_batch
    from toa.plan import RunPlan
    from toa.prompts import iter_prompts
    from toa.servers import attach
    from toa.storage import Store

    with OpenAIDouble(KEY) as double:
        agent = {"alias": "stuck", "endpoint": {"base_url": double.url("stall"), "model": "m", "api_key": KEY},
                 "sampling": {"max_tokens": 8}, "stall_timeout_s": 2, "timeout_s": 300, "retries": 4}
        cfg = load_config(overrides={"agents": [agent], "methods": ["random"], "n": 2, "prompts.limit": 2,
                                     "results_root": str(tmp_path),
                                     "reward": {"kind": "custom", "function": "openai_double:length"}})
        endpoints = {a.alias: attach(a.alias, a.endpoint) for a in cfg.agents}
        start = time.monotonic()
        try:
            stats = run_batch(RunPlan(cfg, cfg.method_objects, "r1"), endpoints, "random", "b0", list(iter_prompts(cfg.prompts)))
        finally:
            close_engines()
        took = time.monotonic() - start
        assert took < 30, f"the stall took {took:.0f} s to be noticed"
        assert stats.calls_failed == 4 and stats.failed
        errors = query(Store(str(tmp_path)), "select error from call_attempts where status = 'error'")["error"]
        assert errors.len() == 4
        for error in errors:
            assert error.startswith("ServerStalled: server 'stuck' stalled: 2 requests running"), error
            assert "vllm:generation_tokens_total=42" in error and "Likely causes" in error
        assert len(double.requests) == 2  # failed at once: not retried against a stalled server
