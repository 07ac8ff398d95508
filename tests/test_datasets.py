"""SFT/DPO assembly (docs/methods.md §7) on hand-built sample tables."""

from __future__ import annotations

import json

from helpers import prompt_row_dict, sample_row_dict

from toa.datasets import build_dpo, build_sft, dpo_jsonl, sft_jsonl
from toa.rows import frame


def sample(prompt_id, order, reward, agent="a", status="ok", reward_status="ok", text=None, method="m"):
    return sample_row_dict(run_id="r", method=method, batch="b", prompt_id=prompt_id, sample_id=f"{prompt_id}-{order}",
                           order=order, agent=agent, action=agent, depth=0, text=text or f"{prompt_id} answer {order}",
                           prompt_tokens=3, completion_tokens=5, status=status, reward=reward, reward_status=reward_status)


PROMPTS = frame("prompts", [prompt_row_dict(prompt_id="p", text="Q?"), prompt_row_dict(prompt_id="q", text="R?")])


def test_sft_takes_best_first_on_ties_and_ignores_errors():
    rows = [sample("p", 0, 0.5), sample("p", 1, 0.9, agent="b"), sample("p", 2, 0.9), sample("p", 3, None, status="error"),
            sample("p", 4, 5.0, reward_status="error"), sample("q", 0, -1.0)]
    sft = build_sft(frame("samples", rows), PROMPTS).sort("prompt_id")
    assert sft["sample_id"].to_list() == ["p-1", "q-0"]
    assert sft["agent"].to_list() == ["b", "a"] and sft["prompt"].to_list() == ["Q?", "R?"]
    assert sft["n_samples"].to_list() == [3, 1]


def test_dpo_rejected_is_rank_r_or_the_last_and_equal_pairs_are_dropped():
    rows = [sample("p", i, r) for i, r in enumerate([0.1, 0.9, 0.5, 0.7])] + [sample("q", 0, 0.3), sample("q", 1, 0.3)]
    samples = frame("samples", rows)
    dpo = build_dpo(samples, PROMPTS, rejected_rank=3)
    assert dpo.height == 1  # q's two responses tie: no preference, no pair
    row = dpo.row(0, named=True)
    assert (row["chosen_id"], row["rejected_id"], row["rejected_rank"]) == ("p-1", "p-2", 3)
    assert row["chosen_reward"] == 0.9 and row["rejected_reward"] == 0.5 and row["prompt"] == "Q?"
    deep = build_dpo(samples, PROMPTS, rejected_rank=30).row(0, named=True)
    assert (deep["rejected_id"], deep["rejected_rank"]) == ("p-0", 4)  # fewer than r: the last


def test_methods_are_ranked_separately():
    rows = [sample("p", 0, 0.2, method="x"), sample("p", 1, 0.8, method="x"), sample("p", 0, 0.6, method="y")]
    sft = build_sft(frame("samples", rows), PROMPTS).sort("method")
    assert sft.select("method", "reward").rows() == [("x", 0.8), ("y", 0.6)]


def test_jsonl_formats_trainers_read():
    rows = [sample("p", 0, 0.1), sample("p", 1, 0.9)]
    samples = frame("samples", rows)
    sft_line = json.loads(sft_jsonl(build_sft(samples, PROMPTS)).splitlines()[0])
    assert sft_line["messages"] == [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "p answer 1"}]
    assert sft_line["reward"] == 0.9 and sft_line["method"] == "m"
    dpo_line = json.loads(dpo_jsonl(build_dpo(samples, PROMPTS, 2)).splitlines()[0])
    assert (dpo_line["prompt"], dpo_line["chosen"], dpo_line["rejected"]) == ("Q?", "p answer 1", "p answer 0")
    assert sft_jsonl(build_sft(frame("samples", []), PROMPTS)) == ""
