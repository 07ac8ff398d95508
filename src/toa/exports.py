"""Training-data exports of one run, per method, in the formats trainers read.

Layout under `out_dir` (one folder per method):
    <method>/sft.jsonl, sft.parquet   chat format: `messages` [user prompt, assistant response]
                                      (TRL SFTTrainer), provenance: run_id, method, prompt_id,
                                      agent, reward, sample_id
    <method>/dpo.jsonl, dpo.parquet   TRL's standard preference format: prompt / chosen / rejected
                                      (plain text), provenance: run_id, method, prompt_id,
                                      chosen_/rejected_agent, _reward, _id, rejected_rank
    <method>/hf/                      a `datasets.DatasetDict` (save_to_disk) with two splits,
                                      "sft" and "dpo": load_from_disk(<method>/hf)["dpo"]
    <method>/README.md                dataset card: the method, the row counts, the run config
    <method>/value_targets.parquet    step_mcts only: value-model targets (prompt, state = steps so
                                      far, visits, mean verified outcome), the `value_targets` rows

The rows are the stored `sft` / `dpo` tables (built by tasks/datasets.py), and every format is
made from the same records: JSONL by toa.datasets.sft_jsonl / dpo_jsonl, Parquet and the HF
dataset from those very lines (SFT) or that very frame (DPO), so the formats cannot drift apart.

push_to_hub: the two splits have different columns, which one Hub config cannot hold, so each
method goes up as two configs, "<method>-sft" and "<method>-dpo" (split "train" each), under one
card for the whole run, e.g. load_dataset(repo, "toa-dpo").
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import polars as pl

from toa.datasets import dpo_jsonl, sft_jsonl
from toa.errors import UnknownRun
from toa.rows import conform
from toa.storage import Store

FORMATS = ("parquet", "jsonl", "hf")
MESSAGE = pl.Struct({"role": pl.Utf8, "content": pl.Utf8})
# The columns sft_jsonl writes, typed: what sft.parquet and the HF "sft" split hold.
SFT_EXPORT_SCHEMA = {
    "messages": pl.List(MESSAGE), "run_id": pl.Utf8, "method": pl.Utf8, "prompt_id": pl.Utf8,
    "agent": pl.Utf8, "reward": pl.Float64, "sample_id": pl.Utf8,
}


def load_run(store: Store, run_id: str) -> tuple[pl.DataFrame, pl.DataFrame, dict[str, Any] | None]:
    """The run's stored sft and dpo rows (sorted for stable files) and its config."""
    sft, dpo = (store.read(t, f"run={run_id}").filter(pl.col("run_id") == run_id).sort("method", "prompt_id")
                for t in ("sft", "dpo"))
    if sft.is_empty() and dpo.is_empty():
        raise UnknownRun(f"run {run_id!r} has no sft or dpo rows in {store.url}; build the datasets first")
    runs = store.read("runs", f"run={run_id}").filter(pl.col("run_id") == run_id).sort("started_at")
    config = json.loads(runs["config_json"][-1]) if runs.height and runs["config_json"][-1] else None
    return sft, dpo, config


def sft_records(sft: pl.DataFrame) -> tuple[str, pl.DataFrame]:
    """The SFT JSONL text and the same lines as a typed frame."""
    text = sft_jsonl(sft)
    rows = [json.loads(line) for line in text.splitlines()]
    return text, pl.DataFrame(rows, schema=SFT_EXPORT_SCHEMA, orient="row") if rows else pl.DataFrame(schema=SFT_EXPORT_SCHEMA)


def dataset_card(run_id: str, methods: list[str], counts: dict[str, dict[str, int]], config: dict[str, Any] | None) -> str:
    lines = ["---", "tags: [toa, synthetic, sft, dpo]", "---", "",
             f"# toa synthetic data: run {run_id}", "",
             "SFT and DPO data sampled from several LLMs and scored by a reward model with toa "
             "(arXiv 2412.17061).", "",
             "SFT: per prompt, the best-scored response, as chat `messages`. "
             "DPO: chosen = the best response, rejected = a lower-ranked one (`rejected_rank`), "
             "as `prompt` / `chosen` / `rejected`. Every row keeps its run, method, prompt, agents, "
             "rewards and sample ids.", "",
             "| method | sft rows | dpo pairs |", "|---|---|---|"]
    lines += [f"| {m} | {counts[m]['sft']} | {counts[m]['dpo']} |" for m in methods]
    lines += ["", "## Run config", "", "```json",
              json.dumps(config, indent=2, ensure_ascii=False) if config is not None else "(not recorded)", "```", ""]
    return "\n".join(lines)


def _hf_dict(sft: pl.DataFrame, dpo: pl.DataFrame):
    from datasets import Dataset, DatasetDict

    return DatasetDict({"sft": Dataset.from_polars(sft), "dpo": Dataset.from_polars(dpo)})


def export_method(folder: Path, sft: pl.DataFrame, dpo: pl.DataFrame, formats: Iterable[str]) -> dict[str, Path]:
    """One method's files; returns {file or folder name: path}."""
    folder.mkdir(parents=True, exist_ok=True)
    sft_text, sft_frame = sft_records(sft)
    out: dict[str, Path] = {}
    if "jsonl" in formats:
        out["sft.jsonl"], out["dpo.jsonl"] = folder / "sft.jsonl", folder / "dpo.jsonl"
        out["sft.jsonl"].write_text(sft_text, encoding="utf-8")
        out["dpo.jsonl"].write_text(dpo_jsonl(dpo), encoding="utf-8")
    if "parquet" in formats:
        out["sft.parquet"], out["dpo.parquet"] = folder / "sft.parquet", folder / "dpo.parquet"
        sft_frame.write_parquet(out["sft.parquet"])
        dpo.write_parquet(out["dpo.parquet"])
    if "hf" in formats:
        out["hf"] = folder / "hf"
        _hf_dict(sft_frame, dpo).save_to_disk(str(out["hf"]))
    return out


def export_value_targets(store: Store, run_id: str, method: str, folder: Path) -> dict[str, Path]:
    """<method>/value_targets.parquet when the method stored value targets (step_mcts)."""
    rows = store.read("value_targets", f"run={run_id}", f"method={method}")
    if rows.is_empty():
        return {}
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / "value_targets.parquet"
    rows.sort("prompt_id", "node_id").write_parquet(target)
    return {"value_targets.parquet": target}


def push(repo_id: str, card: str, parts: dict[str, tuple[pl.DataFrame, pl.DataFrame]]) -> None:
    """Card first, then the configs: push_to_hub merges its config metadata into an existing card,
    while uploading the card afterwards would drop that metadata."""
    from datasets import Dataset, DatasetDict
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, repo_type="dataset", exist_ok=True)
    api.upload_file(path_or_fileobj=card.encode("utf-8"), path_in_repo="README.md", repo_id=repo_id, repo_type="dataset")
    for method, (sft, dpo) in parts.items():
        for kind, frame in (("sft", sft), ("dpo", dpo)):
            DatasetDict({"train": Dataset.from_polars(frame)}).push_to_hub(repo_id, config_name=f"{method}-{kind}")


def export_run(store: Store, run_id: str, out_dir: str | Path, formats: Iterable[str] = FORMATS,
               push_to_hub: str | None = None) -> dict[str, Path]:
    """Export a run's SFT and DPO data per method (see the module docstring for the layout);
    returns {"<method>/<name>": path}. Pushes to the Hub only when `push_to_hub` names a repo."""
    formats = tuple(formats)
    unknown = set(formats) - set(FORMATS)
    if unknown:
        raise ValueError(f"unknown export format(s) {sorted(unknown)}; known: {list(FORMATS)}")
    sft, dpo, config = load_run(store, run_id)
    methods = sorted(set(sft["method"].to_list()) | set(dpo["method"].to_list()))
    paths: dict[str, Path] = {}
    parts: dict[str, tuple[pl.DataFrame, pl.DataFrame]] = {}
    counts: dict[str, dict[str, int]] = {}
    for method in methods:
        mine_sft, mine_dpo = (df.filter(pl.col("method") == method) for df in (sft, dpo))
        folder = Path(out_dir) / method
        files = export_method(folder, mine_sft, mine_dpo, formats)
        files.update(export_value_targets(store, run_id, method, folder))
        counts[method] = {"sft": mine_sft.height, "dpo": mine_dpo.height}
        card = folder / "README.md"
        card.write_text(dataset_card(run_id, [method], counts, config), encoding="utf-8")
        paths.update({f"{method}/{name}": p for name, p in {**files, "README.md": card}.items()})
        parts[method] = (sft_records(mine_sft)[1], conform("dpo", mine_dpo))
    if push_to_hub:
        push(push_to_hub, dataset_card(run_id, methods, counts, config), parts)
    return paths
