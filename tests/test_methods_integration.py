"""All seven method names (the six methods of the TOA paper, PRS in both variants) through the
`toa` flow on real vLLM CPU servers, a real Prefect API and DuckDB, at small n; then the
per-method comparison from SQL and `toa tree` on a stored tree."""

from __future__ import annotations

import polars as pl
import pytest
from helpers import attached_agents

from toa.cli import main as toa_cli
from toa.db import query
from toa.storage import Store

pytestmark = pytest.mark.integration

METHODS = ["random", "parallel_ensemble", "prs", "prs_feedback", "sequential_refine", "moa", "toa", "self_moa",
           "ab_mcts"]
N_PROMPTS, N, M = 2, 2, 2


@pytest.fixture(scope="module")
def run(prefect_api, embedded_servers, tmp_path_factory):
    from toa.flows.synthesize import toa

    root = str(tmp_path_factory.mktemp("methods"))
    result = toa(results_root=root, n=N, limit=N_PROMPTS, methods=METHODS, overrides={
        "agents": attached_agents(embedded_servers), "batch_size": 2,
        "method_options": {"toa": {"width": 2}, "moa": {"n_iter": 2}},
    })
    samples = query(Store(root), "select * from samples where run_id = ?", [result["run_id"]])
    return result, root, samples


def test_every_method_spends_the_same_budget(run):
    result, _, samples = run
    summary = {r["method"]: r for r in result["summary"]}
    assert set(summary) == set(METHODS)
    for method, row in summary.items():
        extra = N_PROMPTS if method == "prs_feedback" else 0  # one feedback call per prompt
        assert row["generations"] == N_PROMPTS * N * M + extra, method
        assert row["generation_errors"] == 0 and row["reward_errors"] == 0, method
        assert row["completion_tokens"] > 0 and row["best_reward"] >= row["mean_reward"], method
    scored = samples.filter(pl.col("reward_status") == "ok")
    assert scored["reward"].is_not_null().all() and (scored["completion_tokens"] > 0).all()


def test_provenance_of_refining_methods(run):
    _, _, samples = run
    prs = samples.filter(pl.col("method") == "prs")
    assert set(prs["action"]) == {"smollm2_layer_0", "smollm2_layer_1"}
    layer1 = prs.filter(pl.col("action") == "smollm2_layer_1")
    assert layer1["parent_id"].is_in(prs["sample_id"].implode()).all()
    moa = samples.filter(pl.col("method") == "moa")
    assert sorted(moa["depth"].unique()) == [0, 1]
    assert moa.filter(pl.col("depth") == 1)["parent_id"].is_in(moa["sample_id"].implode()).all()
    chains = samples.filter((pl.col("method") == "sequential_refine") & pl.col("parent_id").is_not_null())
    assert chains.height == N_PROMPTS * N * (M - 1)
    self_moa = samples.filter(pl.col("method") == "self_moa")
    assert set(self_moa["agent"]) == {"smollm2"}  # samples and aggregations of one model: the first agent
    aggregated = self_moa.filter(pl.col("depth") > 0)
    assert aggregated.height == N_PROMPTS  # N*M = 4: three samples and one aggregation per prompt (§13.1)
    assert aggregated["parent_id"].is_in(self_moa["sample_id"].implode()).all()


def test_toa_trees_are_stored(run):
    result, root, _ = run
    nodes = query(Store(root), "select * from tree_nodes where run_id = ? and method = 'toa'", [result["run_id"]])
    per_prompt = nodes.group_by("prompt_id").agg(
        responses=(pl.col("kind") == "response").sum(),
        root_visits=pl.col("visits").filter(pl.col("kind") == "root").first(),
    )
    assert per_prompt.height == N_PROMPTS
    assert set(per_prompt["responses"]) == {N * M}  # one response node per play
    assert set(per_prompt["root_visits"]) == {N * M + 1}  # visits start at 1


def test_ab_mcts_trees_are_stored(run):
    result, root, samples = run
    nodes = query(Store(root), "select * from tree_nodes where run_id = ? and method = 'ab_mcts'", [result["run_id"]])
    mine = samples.filter(pl.col("method") == "ab_mcts")
    assert nodes.filter(pl.col("kind") == "response").height == mine.height == N_PROMPTS * N * M
    assert set(nodes.filter(pl.col("kind") == "response")["sample_id"]) == set(mine["sample_id"])  # one node per sample
    assert set(mine["agent"]) <= {"smollm2", "gemma3"}


def test_sql_and_tree_commands(run, capsys, tmp_path):
    result, root, samples = run
    toa_cli(["sql", "--root", root, "select method, best_reward, mean_reward, generations, completion_tokens from method_summary"])
    out = capsys.readouterr().out
    assert all(m in out for m in METHODS)
    prompt_id = samples.filter(pl.col("method") == "toa")["prompt_id"][0]
    html = tmp_path / "tree.html"
    toa_cli(["tree", prompt_id, "--root", root, "--html", str(html)])
    text = capsys.readouterr().out
    assert text.splitlines()[0].startswith("n0 root") and "★" in text
    assert "<svg" in html.read_text()
