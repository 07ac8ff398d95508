"""`toa run` as a newcomer meets it: a launched vLLM CPU server with dtype "auto" and
cores assigned by toa, the temporary Prefect API, and output that a terminal or a CI log can
read. The summary formatting is checked on its own first."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers import launched_run_file

from toa.cli import format_summary
from toa.db import query
from toa.servers.machine import cpu_dtype, cpu_info, partition_cores
from toa.storage import Store

ROWS = [{"method": "parallel_ensemble", "prompts": 16, "best_reward": 0.79921, "mean_reward": 0.5675,
         "generations": 64, "generation_errors": 1, "reward_errors": 2, "prompt_tokens": 2044,
         "completion_tokens": 6499, "new_calls": 64, "replayed": 0},
        {"method": "random", "prompts": 16, "best_reward": None, "mean_reward": None, "generations": 64,
         "generation_errors": 0, "reward_errors": 0, "prompt_tokens": 2724, "completion_tokens": 4500,
         "new_calls": 0, "replayed": 64}]


@pytest.mark.parametrize("width", [40, 60, 80, 120])
def test_summary_fits_the_terminal_dropping_columns_from_the_right(width):
    text = format_summary(ROWS, width)
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["method", "prompts", "best"]
    assert all(len(line) <= max(width, len(lines[0].split("  best")[0]) + 8) for line in lines), text
    full = ["parallel_ensemble", "16", "0.799", "0.568", "64", "3", "64", "0", "6499"]
    if width >= 80:
        assert lines[1].split() == full[:len(lines[1].split())] and len(lines[1].split()) >= 7
        assert lines[2].split()[2:4] == ["-", "-"]  # no reward: a dash, never a 0
    if width >= 120:
        assert lines[1].split() == full


@pytest.mark.integration
@pytest.mark.timeout(1200)  # the launched run may take 900 s
def test_a_launched_run_resolves_dtype_and_cores_and_records_them(tmp_path):
    alias = "cli-smollm2"
    run_file, root = launched_run_file(tmp_path, alias)
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["COLUMNS"] = "80"
    proc = subprocess.run([sys.executable, "-m", "toa.cli", "run", "--config", str(run_file)], env=env,
                          capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    dtype, cores = cpu_dtype(cpu_info()), partition_cores(cpu_info().cores, 1)[0]
    assert f"{alias}: vLLM on cpu, dtype {dtype} (auto: " in out
    assert "\x1b[" not in proc.stdout  # a pipe gets plain text: no colour, no bar
    table = proc.stdout[proc.stdout.index("method "):].splitlines()[:2]
    assert all(len(line) <= 80 for line in table), table
    record = json.loads(query(Store(str(root)), "select models_json from runs")["models_json"][0])
    assert record["launch"][alias] == {"device": "cpu", "dtype": dtype, "cpus": cores}
    log = (root / "logs" / f"{alias}.vllm.log").read_text(errors="replace")
    assert f"VLLM_CPU_OMP_THREADS_BIND='{','.join(map(str, cores))}'" in log  # the binding vLLM applied
    assert f"'dtype': '{dtype}'" in log
