"""The rerun shortcut checks what it trusts (docs/design.md §4.4): a finished run's
`result.json` names the shards its result rests on (samples and the methods' further tables,
sft, dpo, verdicts) with their sizes, and a unit's done marker names the shards the unit wrote;
either is trusted only while those shards are there with the recorded sizes. Otherwise the run
resumes normally (the unit is made again from its replayed calls, the datasets rebuilt) and says
why in one line.

- fast: units.check_result / completed / mark_done on hand-written shards (no Prefect);
- integration: `toa run` subprocesses against the OpenAI double (tests/openai_double.py) and a
  real Prefect API: finish a run, delete a samples shard and truncate an sft shard by hand,
  rerun: it says why, resumes with no model call, ends with the same rows; an untouched rerun
  still takes the shortcut.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pytest
from openai_double import OpenAIDouble

from toa.storage import Store
from toa.units import (
    BatchStats,
    check_result,
    completed,
    done_marker,
    mark_done,
    set_aside_changed,
    unit_shards,
    write_result,
)

KEY = "sk-double-key"


# -- fast: the rule ------------------------------------------------------------------------------
@dataclass
class FakeBatch:
    """Stands in for toa.batches.BatchRef: all the unit list needs is the key."""

    key: str


def plan_at(root: Path):
    from toa.config import load_config
    from toa.plan import RunPlan

    cfg = load_config(overrides={"agents": [{"alias": "a", "endpoint": {"base_url": "http://127.0.0.1:9/v1", "model": "m"}}],
                                 "methods": ["random"], "results_root": str(root),
                                 "reward": {"kind": "custom", "function": "openai_double:length"}})
    return RunPlan(cfg, cfg.method_objects, "r1")


def finished_run(root: Path, batches: int = 2):
    """A hand-made finished run: per batch a samples and an sft shard, a done marker naming its
    shards, and a recorded result. Returns (plan, store, units as unit_states gives them)."""
    plan, store = plan_at(root), Store(str(root))
    for i in range(batches):
        for table in ("samples", "sft"):
            store.write_bytes(b"PAR1" + bytes(100 + i), table, "run=r1", "method=random", f"b{i}.parquet")
        mark_done(store, "r1", BatchStats("random", f"b{i}", prompts=2, samples=4))
    units = states(plan, store, batches)
    write_result(plan, {"run_id": "r1", "summary": [{"method": "random", "new_calls": 4, "replayed": 0}]}, len(units))
    return plan, store, units


def states(plan, store, batches: int):
    return [("random", FakeBatch(f"b{i}"), completed(store, "r1", "random", f"b{i}")) for i in range(batches)]


def test_an_untouched_result_is_trusted_and_counts_every_sample_as_replayed(tmp_path):
    plan, store, units = finished_run(tmp_path)
    recorded = json.loads((tmp_path / "runs" / "run=r1" / "result.json").read_text())
    assert recorded["shards"] == {f"{t}/run=r1/method=random/b{i}.parquet": 104 + i
                                  for t in ("samples", "sft") for i in range(2)}
    check = check_result(plan, units)
    assert check.why is None and check.result["summary"] == [{"method": "random", "new_calls": 0, "replayed": 4}]
    assert "shards" not in check.result and "units" not in check.result


@pytest.mark.parametrize("damage", ["delete", "truncate"])
def test_a_deleted_or_truncated_shard_undoes_its_unit_and_the_result_says_why(tmp_path, damage):
    plan, store, _ = finished_run(tmp_path)
    shard = tmp_path / "samples" / "run=r1" / "method=random" / "b1.parquet"
    shard.unlink() if damage == "delete" else shard.write_bytes(shard.read_bytes()[:50])
    units = states(plan, store, 2)
    assert units[0][2] is not None and units[1][2] is None  # only the damaged unit is to do again
    check = check_result(plan, units)
    assert check.result is None
    assert check.why == ("run r1: recorded result names 1 shard that is missing or changed "
                         "(samples/run=r1/method=random/b1.parquet): resuming")


def test_a_changed_dataset_shard_distrusts_the_result_but_not_the_units(tmp_path):
    plan, store, units = finished_run(tmp_path)
    (tmp_path / "sft" / "run=r1" / "method=random" / "b0.parquet").write_bytes(b"PAR1")
    (tmp_path / "sft" / "run=r1" / "method=random" / "b1.parquet").unlink()
    assert all(done is not None for _, _, done in states(plan, store, 2))  # sampling stands: datasets are rebuilt
    check = check_result(plan, units)
    assert check.result is None and "names 2 shards that are missing or changed (sft/run=r1/method=random/b0.parquet, " \
                                      "sft/run=r1/method=random/b1.parquet)" in check.why


def test_a_result_or_marker_from_an_older_toa_is_checked_as_far_as_it_can_be(tmp_path):
    plan, store, units = finished_run(tmp_path)
    result = tmp_path / "runs" / "run=r1" / "result.json"
    result.write_text(json.dumps({k: v for k, v in json.loads(result.read_text()).items() if k != "shards"}))
    assert "names no shards" in check_result(plan, units).why
    # A done marker without shards: its unit is done while its samples shard exists.
    marker = Path(store.path(*done_marker("r1", "random", "b0")))
    marker.write_text(json.dumps({k: v for k, v in json.loads(marker.read_text()).items() if k != "shards"}))
    assert completed(store, "r1", "random", "b0") is not None
    (tmp_path / "samples" / "run=r1" / "method=random" / "b0.parquet").unlink()
    assert completed(store, "r1", "random", "b0") is None


def test_changed_shards_of_a_recorded_result_are_set_aside_as_they_were(tmp_path):
    plan, store, _ = finished_run(tmp_path)
    folder = tmp_path / "samples" / "run=r1" / "method=random"
    (folder / "b0.parquet").write_bytes(b"PAR1 cut")
    (folder / "b1.parquet").unlink()  # missing: nothing to set aside
    assert set_aside_changed(store, "r1") == ["samples/run=r1/method=random/b0.parquet"]
    assert [(f.name.split(".changed-")[0], f.read_bytes()) for f in folder.iterdir()] == [("b0.parquet", b"PAR1 cut")]
    assert set_aside_changed(store, "r1") == [] and set_aside_changed(store, "no-such-run") == []
    # A unit begun ahead of the flow (toa.head_start) may have rewritten its shard already: left alone.
    (folder / "b0.parquet").write_bytes(b"PAR1 made again by the head start")
    assert set_aside_changed(store, "r1", busy=lambda method, batch: (method, batch) == ("random", "b0")) == []
    assert (folder / "b0.parquet").read_bytes() == b"PAR1 made again by the head start"


def test_the_check_stays_a_few_stat_calls_at_scale(tmp_path):
    """1000 units (2000 shards): the whole rerun check, markers and result, well under the
    2 s a rerun of a finished run may take (README)."""
    plan, store, _ = finished_run(tmp_path, batches=1000)
    start = time.perf_counter()
    check = check_result(plan, states(plan, store, 1000))
    took = time.perf_counter() - start
    assert check.result is not None and took < 1.0, took


def test_unit_shards_names_the_tables_a_unit_wrote(tmp_path):
    store = Store(str(tmp_path))
    store.write_bytes(b"abc", "samples", "run=r1", "method=toa", "b0.parquet")
    store.write_bytes(b"abcd", "tree_nodes", "run=r1", "method=toa", "b0.parquet")
    assert unit_shards(store, "r1", "toa", "b0") == {"samples/run=r1/method=toa/b0.parquet": 3,
                                                     "tree_nodes/run=r1/method=toa/b0.parquet": 4}


# -- integration: real `toa run` processes ---------------------------------------------------------
def run_file(tmp_path: Path, double: OpenAIDouble) -> Path:
    lines = [f"results_root = {json.dumps(str(tmp_path / 'results'))}", 'methods = ["random", "parallel_ensemble"]',
             "n = 2", "batch_size = 2", "[prompts]", "limit = 4", "[reward]", 'kind = "custom"',
             'function = "openai_double:length"']
    for alias in ("a", "b"):
        lines += ["[[agents]]", f'alias = "{alias}"', "[agents.endpoint]", f'base_url = "{double.url("ok")}"',
                  'model = "m"', f'api_key = "{KEY}"', "[agents.sampling]", "max_tokens = 8"]
    path = tmp_path / "run.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def toa_run(run_file: Path) -> str:
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PYTHONPATH": str(Path(__file__).parent)}
    proc = subprocess.run([sys.executable, "-m", "toa.cli", "run", "--config", str(run_file), "--no-progress"],
                          env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    return out


def sampling_requests(double: OpenAIDouble, root: Path) -> int:
    """Requests for samples of the run's prompts (not, e.g., an attach-time identity probe)."""
    prompts = set(Store(str(root)).read("prompts")["text"])
    return sum(body["messages"][0]["content"] in prompts for _, _, body in double.requests)


def table(root: Path, name: str) -> pl.DataFrame:
    keys = {"samples": ["method", "batch", "prompt_id", "order", "sample_id"], "sft": ["method", "prompt_id"]}[name]
    return Store(str(root)).read(name).sort(keys)


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_a_rerun_after_shards_were_removed_by_hand_resumes_says_why_and_ends_with_the_same_rows(prefect_api, tmp_path):
    root = tmp_path / "results"
    with OpenAIDouble(KEY) as double:
        path = run_file(tmp_path, double)
        toa_run(path)
        samples, sft, made = table(root, "samples"), table(root, "sft"), sampling_requests(double, root)
        assert made > 0
        assert samples.height == 4 * 4 * 2 and sft.height == 4 * 2

        shortcut = toa_run(path)  # untouched: the recorded result, no flow
        assert "is complete: every (method, batch) unit is done" in shortcut, shortcut[-3000:]

        run_dir, (first, second) = f"run={samples['run_id'][0]}", sorted(set(samples["batch"]))
        lost = root / "samples" / run_dir / "method=random" / f"{first}.parquet"
        cut = [root / "samples" / run_dir / "method=parallel_ensemble" / f"{second}.parquet",
               root / "sft" / run_dir / "method=parallel_ensemble" / f"{first}.parquet"]
        lost.unlink()
        for shard in cut:
            shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
        halves = [shard.read_bytes() for shard in cut]
        resumed = toa_run(path)
        why = [line for line in resumed.splitlines() if "recorded result names 3 shards that are missing or changed" in line]
        assert why and why[0].endswith(": resuming (the 2 changed ones kept as <name>.changed-<time>)"), resumed[-3000:]
        assert all(str(shard.relative_to(root)) in why[0] for shard in [lost, *cut]), why[0]
        assert "is complete" not in resumed
        assert sampling_requests(double, root) == made  # the two units were made again from their recorded calls
        # the truncated shards were set aside, as they were, not overwritten
        assert [next(shard.parent.glob(f"{shard.name}.changed-*")).read_bytes() for shard in cut] == halves

        again_samples, again_sft = table(root, "samples"), table(root, "sft")
        redone = again_samples.filter(((pl.col("method") == "random") & (pl.col("batch") == first))
                                      | ((pl.col("method") == "parallel_ensemble") & (pl.col("batch") == second)))
        assert redone.height == 2 * 2 * 4 and redone["cached"].all()  # replayed, not sampled again
        assert again_samples.drop("cached").equals(samples.drop("cached"))
        assert again_sft.equals(sft)

        shortcut = toa_run(path)  # the rewritten result is trusted again
        assert "is complete: every (method, batch) unit is done" in shortcut and sampling_requests(double, root) == made
