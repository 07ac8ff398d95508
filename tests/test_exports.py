"""Exports: Parquet, JSONL and HF datasets per method, matching the stored sft / dpo rows."""

from __future__ import annotations

import json

import polars as pl
import pytest
from helpers import CONFIG, PROMPTS, write_run  # the hand-built run of the views

from toa.exports import SFT_EXPORT_SCHEMA, export_run
from toa.storage import Store


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    store = Store(str(tmp_path_factory.mktemp("results")))
    write_run(store, "run1")
    out = tmp_path_factory.mktemp("exports")
    return store, out, export_run(store, "run1", out)


def stored(store, table, method):
    return store.read(table, "run=run1").filter(pl.col("method") == method).sort("prompt_id")


@pytest.mark.parametrize("method", ["random", "toa"])
def test_hf_datasets_load_back_equal_to_the_stored_rows(exported, method):
    from datasets import load_from_disk

    store, out, paths = exported
    ds = load_from_disk(str(paths[f"{method}/hf"]))
    assert set(ds) == {"sft", "dpo"}
    sft = stored(store, "sft", method)
    got = ds["sft"].to_list()
    assert [r["prompt_id"] for r in got] == sft["prompt_id"].to_list()
    for row, want in zip(got, sft.iter_rows(named=True)):
        assert row["messages"] == [{"role": "user", "content": want["prompt"]},
                                   {"role": "assistant", "content": want["response"]}]
        assert (row["reward"], row["sample_id"], row["agent"], row["run_id"], row["method"]) == \
               (want["reward"], want["sample_id"], want["agent"], "run1", method)
    assert ds["dpo"].to_list() == stored(store, "dpo", method).to_dicts()


def test_random_rows_are_the_expected_ones(exported):
    store, out, paths = exported
    sft = pl.read_parquet(paths["random/sft.parquet"])
    assert sft.schema == pl.Schema(SFT_EXPORT_SCHEMA)
    assert [(m[1]["content"], r) for m, r in zip(sft["messages"], sft["reward"])] == [("answer r3", 0.9), ("answer r5", 0.4)]
    assert sft["messages"][0][0]["content"] == PROMPTS["p1"]
    dpo = [json.loads(line) for line in paths["random/dpo.jsonl"].read_text().splitlines()]
    assert [(d["prompt"], d["chosen"], d["rejected"], d["chosen_reward"], d["rejected_reward"]) for d in dpo] == \
           [(PROMPTS["p1"], "answer r3", "answer r2", 0.9, 0.1)]


@pytest.mark.parametrize("method", ["random", "toa"])
def test_parquet_and_jsonl_hold_the_same_rows(exported, method):
    _, _, paths = exported
    for kind in ("sft", "dpo"):
        lines = [json.loads(line) for line in paths[f"{method}/{kind}.jsonl"].read_text().splitlines()]
        assert pl.read_parquet(paths[f"{method}/{kind}.parquet"]).to_dicts() == lines


def test_card_carries_method_and_config(exported):
    _, _, paths = exported
    card = paths["toa/README.md"].read_text()
    assert "run run1" in card and "| toa | 1 | 1 |" in card and "| random |" not in card
    assert json.dumps(CONFIG["agents"][0]["alias"]) in card and '"n": 2' in card


def test_formats_are_selectable_and_checked(tmp_path):
    store = Store(str(tmp_path / "r"))
    write_run(store, "run1")
    paths = export_run(store, "run1", tmp_path / "out", formats=("jsonl",))
    assert sorted(paths) == sorted(f"{m}/{f}" for m in ("random", "toa") for f in ("sft.jsonl", "dpo.jsonl", "README.md"))
    with pytest.raises(ValueError, match="csv"):
        export_run(store, "run1", tmp_path / "out", formats=("csv",))
    with pytest.raises(LookupError):
        export_run(store, "missing", tmp_path / "out")


def test_push_to_hub_sends_card_then_one_config_per_method_and_kind(tmp_path, monkeypatch):
    import datasets
    import huggingface_hub

    calls = []

    class FakeApi:
        def create_repo(self, repo_id, **kw):
            calls.append(("create", repo_id))

        def upload_file(self, *, path_or_fileobj, path_in_repo, repo_id, **kw):
            calls.append(("card", path_in_repo, b"run run1" in path_or_fileobj))

    def fake_push(self, repo_id, config_name=None, **kw):
        calls.append(("push", repo_id, config_name, list(self), self["train"].num_rows))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(datasets.DatasetDict, "push_to_hub", fake_push)
    store = Store(str(tmp_path / "r"))
    write_run(store, "run1")
    export_run(store, "run1", tmp_path / "out", formats=("jsonl",), push_to_hub="me/toa-data")
    assert calls == [("create", "me/toa-data"), ("card", "README.md", True),
                     ("push", "me/toa-data", "random-sft", ["train"], 2), ("push", "me/toa-data", "random-dpo", ["train"], 1),
                     ("push", "me/toa-data", "toa-sft", ["train"], 1), ("push", "me/toa-data", "toa-dpo", ["train"], 1)]
