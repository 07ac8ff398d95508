"""Optima's datasets (docs/methods.md §8): SFT = the best dialogue per prompt, one chat example
per speaker; DPO = at every branch point, the best vs the worst child by the mean reward of the
dialogues below each. Built from the stored `samples` and `dialogues` rows of one batch; used
through the optima method's `datasets` hook (toa.methods.optima).

A speaker is read from the utterance's recorded role (its action `<role>_r<round>`), not
re-derived from its depth.
"""

from __future__ import annotations

import json

import polars as pl

from toa.dialogue import ROLES, view
from toa.rows import OK, DpoRow, SftRow, frame


def build_dialogue_datasets(samples: pl.DataFrame, prompts: pl.DataFrame, dialogues: pl.DataFrame,
                            margin: float) -> tuple[pl.DataFrame, pl.DataFrame]:
    """SFT and DPO rows (sft / dpo schemas) from stored samples and dialogues of one method."""
    texts = dict(zip(prompts["prompt_id"], prompts["text"]))
    utter = {r["sample_id"]: r for r in samples.iter_rows(named=True)}
    sft, dpo = [], []
    for (run_id, method, prompt_id), group in dialogues.group_by(["run_id", "method", "prompt_id"], maintain_order=True):
        if prompt_id not in texts:
            continue
        found = [r for r in group.iter_rows(named=True) if all(u in utter for u in json.loads(r["utterance_ids"]))]
        keys = {"run_id": run_id, "method": method, "prompt_id": prompt_id}
        sft += _sft_rows(keys, texts[prompt_id], found, utter)
        dpo += _dpo_rows(keys, texts[prompt_id], found, utter, margin)
    return frame("sft", sft), frame("dpo", dpo)


def _speaker(utterance: dict, mode: str) -> int:
    """0 or 1: the speaker of a stored utterance, from its recorded role."""
    return ROLES[mode].index(utterance["action"].split("_r")[0])


def _turns(ids: list[str], utter: dict, mode: str) -> list[tuple[int, str]]:
    return [(_speaker(utter[u_id], mode), utter[u_id]["text"] or "") for u_id in ids]


def _sft_rows(keys, prompt_text, dialogues: list[dict], utter) -> list[SftRow]:
    scored = [d for d in dialogues if d["reward_status"] == OK and d["reward"] is not None]
    if not scored:
        return []
    best = max(scored, key=lambda d: d["reward"])  # max keeps the first of equal rewards
    ids = json.loads(best["utterance_ids"])
    turns = _turns(ids, utter, best["mode"])
    rows = []
    for speaker in sorted({s for s, _ in turns}):
        messages = view(prompt_text, best["mode"], speaker, turns)
        while messages[-1]["role"] != "assistant":
            messages.pop()
        first = next(utter[i] for i in ids if _speaker(utter[i], best["mode"]) == speaker)
        rows.append(SftRow(**keys, prompt=messages[0]["content"], response=_flat(messages[1:]),
                           agent=first["agent"], action=first["action"].split("_r")[0], reward=best["reward"],
                           sample_id=best["dialogue_id"], n_samples=len(scored),
                           messages=json.dumps(messages, ensure_ascii=False)))
    return rows


def _dpo_rows(keys, prompt_text, dialogues: list[dict], utter, margin: float) -> list[DpoRow]:
    """At every node with several children: best vs worst child by the mean reward of the
    dialogues below each, when the gap is at least `margin` and the texts differ."""
    values: dict[str, list[float]] = {}
    children: dict[str | None, list[str]] = {}
    for d in dialogues:
        ids = json.loads(d["utterance_ids"])
        for i, u in enumerate(ids):
            if u not in children.setdefault(ids[i - 1] if i else None, []):
                children[ids[i - 1] if i else None].append(u)
            if d["reward_status"] == OK and d["reward"] is not None:
                values.setdefault(u, []).append(d["reward"])
    rows = []
    for parent, kids in children.items():
        ranked = sorted((k for k in kids if k in values), key=lambda k: -sum(values[k]) / len(values[k]))
        if len(ranked) < 2:
            continue
        hi, lo = ranked[0], ranked[-1]
        v_hi, v_lo = (sum(values[k]) / len(values[k]) for k in (hi, lo))
        if v_hi - v_lo < margin or v_hi <= v_lo or utter[hi]["text"] == utter[lo]["text"]:
            continue
        mode = _mode(dialogues)
        history = _turns(_ancestry(parent, utter), utter, mode)
        context = view(prompt_text, mode, _speaker(utter[hi], mode), history)
        rows.append(DpoRow(**keys, prompt=_flat(context), chosen=utter[hi]["text"], rejected=utter[lo]["text"],
                           chosen_agent=utter[hi]["agent"], rejected_agent=utter[lo]["agent"],
                           chosen_reward=v_hi, rejected_reward=v_lo, rejected_rank=len(ranked),
                           chosen_id=hi, rejected_id=lo, prompt_messages=json.dumps(context, ensure_ascii=False)))
    return rows


def _ancestry(node: str | None, utter) -> list[str]:
    out = []
    while node is not None:
        out.append(node)
        node = utter[node]["parent_id"]
    return out[::-1]


def _mode(dialogues: list[dict]) -> str:
    return dialogues[0]["mode"]


def _flat(messages: list[dict[str, str]]) -> str:
    """A chat as plain text (single user message: its content unchanged)."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in messages)
