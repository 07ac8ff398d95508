"""Verdicts: is each generation of a verifiable prompt source correct?

For GSM8K- and MATH-style sources (prompts.preset / answer_format) every prompt's reference is
a gold answer, so every generation can be checked, whatever reward model scored it (the
similarity default, a judge, a reward model). The check is toa.reward.math_verify's: the same
extraction and comparison as the `math` reward, so accuracy and the math reward never disagree.
The extracted answer is kept as text (a number as %.10g, so "3/4" and "0.75" vote together in a
majority vote; a symbolic answer normalised), and the views in sql/accuracy.sql turn verdicts
into accuracy at a budget per method (best-of-k by reward, majority vote, pass@k).

Plain Python; tasks/verdicts.py runs it in the flow. It makes no model call, so a rerun simply
rewrites the same shard.
"""

from __future__ import annotations

import polars as pl

from toa.reward import math_verify as mv
from toa.rows import OK, SKIPPED, Prompt, VerdictRow
from toa.storage import Store

VERIFIER = mv.IDENTITY


def extracted_answer(response: str, reference: str) -> str | None:
    """The response's final answer as comparable text, the way the verifier reads it."""
    if mv.gold_value(reference) is None and mv.is_symbolic(reference):
        boxed = mv.boxed_contents(mv.clean(response))
        return mv.normalize_symbolic(boxed[-1]) if boxed else None
    value = mv.extract_answer(response)
    return None if value is None else f"{value:.10g}"


def verdict(prompt: Prompt, response: str) -> tuple[str | None, bool] | None:
    """(answer, correct), or None when the prompt's reference is not a checkable gold answer."""
    score = mv.score_one(prompt, response)
    if score.status != OK or score.value is None:
        return None
    return extracted_answer(response, str(prompt.reference)), score.value == 1.0


def verdict_rows(samples: pl.DataFrame, prompts: dict[str, Prompt]) -> list[VerdictRow]:
    """One row per successful generation that answers a prompt with a checkable reference (PRS
    feedback calls, whose reward is 'skipped', are not answers)."""
    rows = []
    ok = samples.filter((pl.col("status") == OK) & (pl.col("reward_status") != SKIPPED) & pl.col("text").is_not_null())
    for s in ok.iter_rows(named=True):
        prompt = prompts.get(s["prompt_id"])
        judged = verdict(prompt, s["text"]) if prompt is not None else None
        if judged is None:
            continue
        rows.append(VerdictRow(run_id=s["run_id"], method=s["method"], prompt_id=s["prompt_id"],
                               sample_id=s["sample_id"], answer=judged[0], correct=judged[1], verifier=VERIFIER))
    return rows


def write_verdicts(store: Store, run_id: str, prompt_source: str) -> int:
    """Judge every stored generation of the run against the prompts of its source; returns the
    number of verdicts. One deterministic shard per run: a rerun overwrites it."""
    samples = store.read("samples", f"run={run_id}")
    prompts = {r["prompt_id"]: Prompt(**{k: r[k] for k in ("prompt_id", "text", "reference", "source", "line")})
               for r in store.read("prompts", f"source={prompt_source}").iter_rows(named=True)}
    rows = verdict_rows(samples, prompts)
    store.write_rows("verdicts", rows, f"run={run_id}", "verdicts.parquet")
    return len(rows)


__all__ = ["VERIFIER", "extracted_answer", "verdict", "verdict_rows", "write_verdicts"]
