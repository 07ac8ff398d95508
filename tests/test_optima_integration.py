"""The `optima` dialogue method through the `toa` flow on the real vLLM CPU servers (SmolLM2 as
solver, Gemma 3 as critic), a real Prefect API and DuckDB, at tiny sizes: 2 GSM8K-style prompts
with gold answers, n = 2 (4 dialogues per prompt, branched [2, 2]), 32-token utterances, round
limit 3. Checks the rows in DuckDB (samples, dialogues, tree nodes), the datasets, and that a
rerun makes zero model calls."""

from __future__ import annotations

import json

import polars as pl
import pytest
from helpers import attached_agents

from toa.db import query
from toa.storage import Store

pytestmark = pytest.mark.integration

PROMPTS = [
    {"id": "g1", "question": "A baker makes 12 muffins. He sells 5 of them. How many muffins are left?", "answer": "#### 7"},
    {"id": "g2", "question": "Tom has 3 boxes. Each box holds 4 pencils. How many pencils does Tom have?", "answer": "#### 12"},
]
N, ROUNDS, MARGIN = 2, 3, 0.1


@pytest.fixture(scope="module")
def optima_run(prefect_api, embedded_servers, tmp_path_factory):
    from toa.flows.synthesize import toa

    root = tmp_path_factory.mktemp("optima")
    prompts = root / "gsm.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    args = {"results_root": str(root / "results"), "n": N, "methods": ["optima"], "prompts_path": str(prompts), "overrides": {
        "agents": attached_agents(embedded_servers), "reward.kind": "math",
        "prompts.text_field": "question", "prompts.id_field": "id", "prompts.reference_field": "answer",
        "method_options": {"optima": {"max_rounds": ROUNDS, "dpo_margin": MARGIN}},
    }}
    first = toa(**args)
    second = toa(**args)
    return first, second, Store(str(root / "results"))


def test_dialogues_run_on_real_servers_with_provenance(optima_run):
    first, _, store = optima_run
    run_id = first["run_id"]
    (row,) = first["summary"]
    assert row["method"] == "optima" and row["generation_errors"] == 0 and row["new_calls"] > 0
    samples = query(store, "select * from samples where run_id = ? and method = 'optima'", [run_id])
    assert samples.height == row["generations"]
    assert set(samples["agent"]) == {"smollm2", "gemma3"}
    assert samples.filter(pl.col("agent") == "smollm2")["action"].str.starts_with("solver_r").all()
    assert samples.filter(pl.col("agent") == "gemma3")["action"].str.starts_with("critic_r").all()
    assert samples.filter(pl.col("depth") == 0).height == len(PROMPTS) * 2  # branching [2, 2]
    inner = samples.filter(pl.col("parent_id").is_not_null())
    assert inner["parent_id"].is_in(samples["sample_id"].implode()).all()

    dialogues = query(store, "select d.*, s.reward as sample_reward from dialogues d join samples s "
                             "on s.sample_id = d.dialogue_id and s.run_id = d.run_id where d.run_id = ?", [run_id])
    assert dialogues.height == len(PROMPTS) * N * 2
    assert set(dialogues["stop_reason"]) <= {"agree", "max_rounds"}
    assert (dialogues["turns"] <= 2 * ROUNDS - 1).all()
    assert (dialogues["reward_status"] == "ok").all() and (dialogues["max_loss"] > 0).all()  # real logprobs
    assert (dialogues["reward"] == dialogues["sample_reward"]).all()
    assert set(dialogues["correct"]) <= {0.0, 1.0}


def test_sft_and_dpo_from_the_dialogue_tree(optima_run):
    first, _, store = optima_run
    run_id = first["run_id"]
    sft = query(store, "select * from sft where run_id = ? and method = 'optima'", [run_id])
    assert sft.height == len(PROMPTS) * 2  # best dialogue, one example per speaker
    for r in sft.iter_rows(named=True):
        messages = json.loads(r["messages"])
        assert messages[0]["role"] == "user" and messages[-1]["role"] == "assistant"
    # Every branch point whose best and worst child differ by MARGIN (mean reward of the
    # dialogues below, as stored on the tree nodes) and say different things (two samples of a
    # tiny model are sometimes the same text) gives exactly one DPO pair; none otherwise.
    nodes = query(store, """select n.*, s.text from tree_nodes n join samples s using (run_id, method, prompt_id, sample_id)
                            where n.run_id = ? and n.method = 'optima'""", [run_id])
    gaps = (nodes.filter(pl.col("kind") == "response").sort("value").group_by("prompt_id", "parent_id")
            .agg(n=pl.len(), gap=pl.col("value").last() - pl.col("value").first(),
                 same_text=pl.col("text").last() == pl.col("text").first()).filter(pl.col("n") > 1))
    dpo = query(store, "select * from dpo where run_id = ? and method = 'optima'", [run_id])
    assert gaps.height == len(PROMPTS) * 3  # root + the two first utterances branch, per prompt
    assert dpo.height == gaps.filter((pl.col("gap") >= MARGIN) & ~pl.col("same_text")).height
    assert ((dpo["chosen_reward"] - dpo["rejected_reward"]) >= MARGIN).all()
    assert first["datasets"]["optima"] == {"sft": sft.height, "dpo": dpo.height}


def test_rerun_makes_zero_model_calls(optima_run):
    first, second, _ = optima_run
    assert second["run_id"] == first["run_id"]
    (row,) = second["summary"]
    assert row["new_calls"] == 0 and row["replayed"] == first["summary"][0]["generations"]
    assert second["datasets"] == first["datasets"]


def test_information_split_mode_each_speaker_sees_its_half(prefect_api, embedded_servers, tmp_path):
    from toa.flows.synthesize import toa
    from toa.dialogue import intro

    prompts = tmp_path / "gsm.jsonl"
    prompts.write_text(json.dumps(PROMPTS[0]) + "\n")  # "A baker makes 12 muffins. He sells 5 of them. How many ...?"
    result = toa(results_root=str(tmp_path / "results"), n=1, methods=["optima"], prompts_path=str(prompts), overrides={
        "agents": attached_agents(embedded_servers), "reward.kind": "math",
        "prompts.text_field": "question", "prompts.id_field": "id", "prompts.reference_field": "answer",
        "method_options": {"optima": {"mode": "split", "max_rounds": 2}},
    })
    (row,) = result["summary"]
    assert row["generation_errors"] == 0 and row["new_calls"] > 0
    store = Store(str(tmp_path / "results"))
    samples = query(store, "select agent, action from samples where run_id = ?", [result["run_id"]])
    assert set(samples["action"].str.slice(0, 3)) <= {"a_r", "b_r"} and set(samples["agent"]) == {"smollm2", "gemma3"}
    for call in query(store, "select agent, request_json from calls").iter_rows(named=True):
        # The first message is the speaker's intro, then (second speaker) the partner's first
        # utterance, which may well quote the partner's half: that is what the dialogue is for.
        speaker = 0 if call["agent"] == "smollm2" else 1
        own_intro = intro(PROMPTS[0]["question"], "split", speaker)
        assert json.loads(call["request_json"])["messages"][0]["content"].startswith(own_intro)
        mine, other = ("makes 12 muffins", "sells 5 of them")[::1 if speaker == 0 else -1]
        assert mine in own_intro and other not in own_intro, (call["agent"], own_intro)
