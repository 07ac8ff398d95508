"""SFT and DPO datasets from the stored samples (docs/methods.md §7).

SFT: per prompt, the best response (argmax raw reward; first in generation order on ties).
DPO: chosen = the best, rejected = the response ranked r-th by reward (paper: best of 160 vs
the 30th; `RunConfig.rejected_rank` scales r to the budget). When fewer than r responses were
scored, the lowest-ranked one is used. A pair is dropped when the rejected reward equals the
chosen one (it carries no preference) or the two texts are identical.
Only samples whose generation and reward both succeeded take part; errors are never ranked.
A method may build its own rows instead (`method_builder`; multi-turn rows carry chat JSON in
`sft.messages` / `dpo.prompt_messages`).
"""

from __future__ import annotations

import json

import polars as pl

from toa.rows import OK, conform


def ranked(samples: pl.DataFrame) -> pl.DataFrame:
    """Scored samples with their 1-based rank per (run, method, prompt)."""
    ok = samples.filter((pl.col("status") == OK) & (pl.col("reward_status") == OK) & pl.col("reward").is_not_null())
    group = ["run_id", "method", "prompt_id"]
    return (
        ok.sort([*group, "reward", "order"], descending=[False, False, False, True, False])
        .with_columns(rank=pl.int_range(1, pl.len() + 1).over(group), n_samples=pl.len().over(group))
    )


def build_sft(samples: pl.DataFrame, prompts: pl.DataFrame) -> pl.DataFrame:
    best = ranked(samples).filter(pl.col("rank") == 1)
    return conform("sft", (  # the sft columns (n_samples, a count, cast to the table's Int64)
        best.join(prompts.select("prompt_id", pl.col("text").alias("prompt")), on="prompt_id", how="left")
        .rename({"text": "response"})
        .with_columns(messages=pl.lit(None, pl.Utf8))  # single turn: [prompt, response]
    ))


def build_dpo(samples: pl.DataFrame, prompts: pl.DataFrame, rejected_rank: int) -> pl.DataFrame:
    r = ranked(samples)
    group = ["run_id", "method", "prompt_id"]
    chosen = r.filter(pl.col("rank") == 1)
    rejected = r.filter(pl.col("rank") == pl.min_horizontal(pl.lit(rejected_rank), pl.col("n_samples")))
    pairs = chosen.join(rejected, on=group, suffix="_r").filter(
        (pl.col("rank_r") > 1) & (pl.col("reward") > pl.col("reward_r")) & (pl.col("text") != pl.col("text_r"))
    )
    return conform("dpo", (
        pairs.join(prompts.select("prompt_id", pl.col("text").alias("prompt")), on="prompt_id", how="left")
        .select(
            *group, "prompt", pl.col("text").alias("chosen"), pl.col("text_r").alias("rejected"),
            pl.col("agent").alias("chosen_agent"), pl.col("agent_r").alias("rejected_agent"),
            pl.col("reward").alias("chosen_reward"), pl.col("reward_r").alias("rejected_reward"),
            pl.col("rank_r").alias("rejected_rank"), pl.col("sample_id").alias("chosen_id"),
            pl.col("sample_id_r").alias("rejected_id"), pl.lit(None, pl.Utf8).alias("prompt_messages"),
        )
    ))


def sft_jsonl(sft: pl.DataFrame) -> str:
    """Chat-format SFT lines (`messages`), the shape TRL's SFTTrainer reads, with provenance."""
    lines = []
    for row in sft.iter_rows(named=True):
        messages = json.loads(row["messages"]) if row.get("messages") else \
            [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["response"]}]
        meta = {k: row[k] for k in ("run_id", "method", "prompt_id", "agent", "reward", "sample_id")}
        lines.append(json.dumps({"messages": messages, **meta}, ensure_ascii=False))
    return "\n".join(lines) + ("\n" if lines else "")


def dpo_jsonl(dpo: pl.DataFrame) -> str:
    """prompt / chosen / rejected lines, as TRL's DPOTrainer reads them, with provenance."""
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in dpo.iter_rows(named=True))
