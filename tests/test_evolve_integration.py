"""End to end: the `toa-evolve` flow on the real embedded vLLM servers (session fixture), a real
Prefect API and DuckDB: sample -> reward -> evolve -> sample again; evolved prompts and their
provenance are queryable, the second iteration samples them, and a rerun makes no model call."""

from __future__ import annotations

import pytest
from helpers import attached_agents

from toa.db import query
from toa.storage import Store

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("evolve-results"))


def run_loop(root: str, endpoints) -> dict:
    from toa.flows.evolve import toa_evolve

    return toa_evolve(iterations=1, methods=["random"], n=1, limit=4, results_root=root,
                      overrides={"agents": attached_agents(endpoints, max_tokens=32), "batch_size": 4},
                      evolve={"fraction": 0.5, "evolutions": 3, "max_tokens": 48, "reference_max_tokens": 32})


@pytest.fixture(scope="module")
def first(prefect_api, embedded_servers, root) -> dict:
    return run_loop(root, embedded_servers)


def test_iterations_are_recorded(first, root):
    store = Store(root)
    its = query(store, "SELECT * FROM evolve_iterations WHERE evolve_id = ? ORDER BY iteration", [first["evolve_id"]])
    assert its["iteration"].to_list() == [0, 1]
    assert its["run_id"].to_list() == first["run_ids"] and len(set(first["run_ids"])) == 2
    assert its["prompts"][0] == 4 and its["selected"][1] == 2 and its["evolved"][1] >= 1
    assert its["prompts"][1] > its["evolved"][1]  # evolved prompts mixed with originals


def test_evolved_prompts_have_provenance_and_are_sampled(first, root):
    store = Store(root)
    run0, run1 = first["run_ids"]
    evo = query(store, "SELECT * FROM evolutions WHERE evolve_id = ? AND iteration = 1", [first["evolve_id"]])
    assert evo.height == 2 * 3  # two selected prompts, three rewrites each, kept or not
    kept = evo.filter(evo["status"] == "ok")
    assert kept.height >= 1, evo.select("status", "reason", "text").to_dicts()
    originals = set(query(store, "SELECT DISTINCT prompt_id FROM samples WHERE run_id = ?", [run0])["prompt_id"])
    assert set(evo["root_prompt_id"]) <= originals
    assert set(kept["parent_prompt_id"]) <= originals | set(kept["prompt_id"])
    assert kept["reference"].drop_nulls().len() == kept.height and kept["agent"].unique().to_list() == ["smollm2"]
    # every rewrite and reference call is in the request record under its content key
    keys = set(kept["call_key"]) | set(kept["reference_call_key"])
    recorded = query(store, "SELECT call_key FROM calls WHERE call_key IN (SELECT unnest(?::VARCHAR[]))", [list(keys)])
    assert recorded.height == len(keys)
    sampled = query(store, "SELECT DISTINCT prompt_id FROM samples WHERE run_id = ? AND status = 'ok'", [run1])
    assert set(kept["prompt_id"]) <= set(sampled["prompt_id"])  # the second iteration sampled them


def test_rerun_makes_no_model_call(first, root, embedded_servers):
    store = Store(root)
    before = query(store, "SELECT count(*) AS n FROM call_attempts")["n"][0]
    again = run_loop(root, embedded_servers)
    assert again["run_ids"] == first["run_ids"] and again["evolve_id"] == first["evolve_id"]
    assert query(store, "SELECT count(*) AS n FROM call_attempts")["n"][0] == before
    assert all(row["new_calls"] == 0 for run in again["runs"] for row in run["summary"])
