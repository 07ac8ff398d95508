"""Resume in the middle of a TOA tree: a real `toa run` process is killed (SIGKILL) while its
batch is half done, then run again. The rerun replays the recorded calls, makes only the
missing ones, and ends with the same trees as an uninterrupted run with the same seed.

"The same" needs the same responses: a vLLM server is not bit-reproducible across batch
compositions (two uninterrupted runs with one seed were seen to differ in 1-2 of 12 texts, and
embeddings computed in different batches in the 8th decimal), so the uninterrupted run is
given the responses and rewards the resumed run received (its call and reward records, nothing
else) and must rebuild the identical trees without a single model call. What toa guarantees,
and what this checks, is that the search is a function of the seed and those records: the
crash and the resume leave no trace in the result."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
from helpers import attached_agents

from toa.db import query
from toa.storage import Store

# the kill waits up to 600 s for calls, each of the two reruns up to 900 s
pytestmark = [pytest.mark.integration, pytest.mark.timeout(3000)]

N_PROMPTS, N, M = 2, 3, 2
PLAYS = N_PROMPTS * N * M


def write_run_file(path: Path, root: Path, endpoints) -> Path:
    import json

    agents = attached_agents(endpoints, max_tokens=24, key_env=True)
    lines = [f'results_root = {json.dumps(str(root))}', 'methods = ["toa"]', f"n = {N}", "batch_size = 2",
             "[prompts]", f"limit = {N_PROMPTS}", "[method_options.toa]", "width = 2"]
    for a in agents:
        ep = a["endpoint"]
        lines += ["[[agents]]", f'alias = "{a["alias"]}"', "[agents.endpoint]", f'base_url = "{ep["base_url"]}"',
                  f'model = "{ep["model"]}"', f'api_key_env = "{ep["api_key_env"]}"',
                  "[agents.sampling]", "max_tokens = 24"]
    path.write_text("\n".join(lines) + "\n")
    return path


def env_for(endpoints) -> dict[str, str]:
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    for alias, ep in endpoints.items():
        env[f"TOA_TEST_KEY_{alias.upper()}"] = ep.api_key.get_secret_value()
    return env


def toa_run(run_file: Path, env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "toa.cli", "run", "--config", str(run_file)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def recorded_calls(root: Path) -> int:
    files = [f for f in (root / "calls").rglob("part-*.parquet")]
    return sum(pl.read_parquet(f).height for f in files)


def trees(root: Path) -> pl.DataFrame:
    store = Store(str(root))
    return query(store, """select n.prompt_id, n.node_id, n.parent_id, n.kind, n.agent, n.depth, n.visits,
                                  round(n.value, 9) as value, n.n_values, s.text
                           from tree_nodes n left join samples s using (run_id, method, prompt_id, sample_id)
                           order by n.prompt_id, n.created""")


def test_killed_run_resumes_mid_tree(prefect_api, embedded_servers, tmp_path):
    env = env_for(embedded_servers)
    resumed_root = tmp_path / "resumed"
    run_file = write_run_file(tmp_path / "resumed.toml", resumed_root, embedded_servers)
    proc = toa_run(run_file, env)
    deadline = time.monotonic() + 600
    while recorded_calls(resumed_root) < PLAYS // 3:
        assert proc.poll() is None, f"toa run ended before it could be killed:\n{proc.stdout.read().decode()[-3000:]}"
        assert time.monotonic() < deadline, "no calls recorded in time"
        time.sleep(0.2)  # polling the shards, not waiting for readiness
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = recorded_calls(resumed_root)
    assert 0 < before < PLAYS, "the kill must land in the middle of the batch"
    assert not (resumed_root / "done").exists()  # the batch had not finished

    rerun = toa_run(run_file, env)
    out = rerun.communicate(timeout=900)[0].decode()
    assert rerun.returncode == 0, out[-3000:]
    attempts = query(Store(str(resumed_root)), "select count(*) as n, count(distinct call_key) as k from call_attempts")
    assert attempts.rows() == [(PLAYS, PLAYS)]  # recorded calls were replayed, none made twice

    straight_root = tmp_path / "straight"
    for record in ("calls", "rewards"):
        shutil.copytree(resumed_root / record, straight_root / record)
    straight = toa_run(write_run_file(tmp_path / "straight.toml", straight_root, embedded_servers), env)
    out = straight.communicate(timeout=900)[0].decode()
    assert straight.returncode == 0, out[-3000:]
    assert query(Store(str(straight_root)), "select count(*) as n from call_attempts")["n"][0] == PLAYS  # no new call
    resumed, uninterrupted = trees(resumed_root), trees(straight_root)
    assert resumed.filter(pl.col("kind") == "response").height == PLAYS
    assert resumed.equals(uninterrupted)
