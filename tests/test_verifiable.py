"""Unit tests of verifiable prompt sources (GSM8K / MATH presets), verdicts, and the accuracy
views (sql/accuracy.sql) checked against brute force over every k-subset."""

from __future__ import annotations

import itertools
import json
from collections import Counter
from pathlib import Path

import pytest
from helpers import sample_row_dict

from toa.db import query
from toa.prompts import PromptSource, load_prompts
from toa.rows import Prompt
from toa.storage import Store
from toa.verdicts import extracted_answer, verdict, verdict_rows

DATA = Path(__file__).parent / "data"


def test_gsm8k_preset_keeps_the_gold_after_hashes():
    prompts, skipped = load_prompts(PromptSource(path=str(DATA / "gsm8k_tiny.jsonl"), preset="gsm8k"))
    assert not skipped and [p.reference for p in prompts] == ["7", "12", "60", "140", "1500"]
    assert prompts[0].text.startswith("A baker makes 12 muffins")
    bare, _ = load_prompts(PromptSource(path=str(DATA / "gsm8k_bare.jsonl"), preset="gsm8k"))
    assert [(p.prompt_id, p.reference) for p in bare] == [("1", "42"), ("2", "64")]


def test_math_preset_answer_then_last_boxed():
    prompts, _ = load_prompts(PromptSource(path=str(DATA / "math_tiny.jsonl"), preset="math"))
    assert [p.reference for p in prompts] == ["1", "32", "\\frac{3}{4}", "(3, -1)", "9"]


def test_preset_fills_only_unset_fields_and_enters_the_fingerprint():
    src = PromptSource(path="x.jsonl", preset="gsm8k", text_field="q")
    assert (src.text_field, src.reference_field, src.answer_format) == ("q", "answer", "gsm8k")
    assert src.verifiable and not PromptSource(path="x.jsonl").verifiable
    plain = PromptSource(path="x.jsonl", text_field="question", reference_field="answer")
    assert plain.fingerprint()["answer_format"] == "raw"
    assert src.fingerprint()["answer_format"] == "gsm8k"


def test_a_row_without_a_gold_is_a_bad_row(tmp_path):
    path = tmp_path / "g.jsonl"
    path.write_text(json.dumps({"question": "How many?", "answer": "It is #### "}) + "\n")
    _, skipped = load_prompts(PromptSource(path=str(path), preset="gsm8k", on_bad_row="skip"))
    assert skipped[0].reason == "field 'answer' holds no gsm8k gold answer"


def test_verdicts_numeric_and_symbolic():
    p = Prompt("a", "What is 3/4 as a decimal?", "0.75")
    assert verdict(p, "It is \\boxed{\\frac{3}{4}}") == ("0.75", True)
    assert verdict(p, "The answer is 3/4") == ("0.75", True)
    assert verdict(p, "I think 0.7") == ("0.7", False)
    assert verdict(p, "no idea") == (None, False)
    sym = Prompt("b", "Solve.", "(3, -1)")
    assert verdict(sym, "so \\boxed{(3,-1)}") == ("(3,-1)", True)
    assert extracted_answer("1,500 chickens", "1500") == "1500"
    assert verdict(Prompt("c", "x", None), "5") is None  # nothing to check against: no verdict


# --- accuracy views against brute force -------------------------------------------------------

# (reward, answer text) per sample, in generation order; gold is "7" for every prompt
SAMPLES = {
    "p1": [(0.9, "The answer is 7"), (0.4, "I get 8"), (0.9, "so 6"), (0.1, "7")],
    "p2": [(0.2, "8"), (0.5, "8"), (0.3, "answer: 7"), (0.8, "maybe 9")],
    "p3": [(0.6, "seven?"), (0.6, "7"), (0.2, "7"), (0.7, "7")],
}


def _write_run(store: Store, run_id: str = "r1", method: str = "m"):
    rows = [sample_row_dict(run_id=run_id, method=method, batch="b", prompt_id=p, sample_id=f"{p}-{i}", order=i,
                            agent="a", action="a", depth=0, text=text, status="ok", reward=r,
                            reward_status="ok", prompt_tokens=1, completion_tokens=1)
            for p, items in SAMPLES.items() for i, (r, text) in enumerate(items)]
    store.write_rows("samples", rows, f"run={run_id}", f"method={method}", "b.parquet")
    import polars as pl

    prompts = {p: Prompt(p, "q", "7") for p in SAMPLES}
    verdicts = verdict_rows(pl.DataFrame(rows), prompts)
    store.write_rows("verdicts", verdicts, f"run={run_id}", "verdicts.parquet")
    return verdicts


def _brute(k: int) -> tuple[float, float, float]:
    """best-of-k (uniform ties), majority of the first k, pass@k: means over prompts."""
    bok, maj, pak = [], [], []
    for items in SAMPLES.values():
        judged = [(r, extracted_answer(t, "7"), verdict(Prompt("x", "q", "7"), t)[1]) for r, t in items]
        kk = min(k, len(judged))
        subsets = list(itertools.combinations(judged, kk))
        exp = 0.0
        for sub in subsets:
            best = max(r for r, _, _ in sub)
            tied = [c for r, _, c in sub if r == best]
            exp += sum(tied) / len(tied)
        bok.append(exp / len(subsets))
        pak.append(sum(any(c for _, _, c in sub) for sub in subsets) / len(subsets))
        first = [(a, c) for _, a, c in judged[:kk] if a is not None]
        counts = Counter(a for a, _ in first)
        if counts:
            top = max(counts.values())
            winner = next(a for a, _ in first if counts[a] == top)  # ties: the answer given first
            maj.append(float(dict(first)[winner]))
        else:
            maj.append(0.0)
    n = len(SAMPLES)
    return sum(bok) / n, sum(maj) / n, sum(pak) / n


def test_accuracy_at_budget_matches_brute_force(tmp_path):
    store = Store(str(tmp_path))
    verdicts = _write_run(store)
    assert len(verdicts) == 12
    got = query(store, "SELECT * FROM accuracy_at_budget WHERE run_id = ? ORDER BY k", ["r1"])
    assert got["k"].to_list() == [1, 2, 3, 4] and set(got["prompts"]) == {3}
    for row in got.iter_rows(named=True):
        bok, maj, pak = _brute(row["k"])
        assert row["best_of_k"] == pytest.approx(bok, abs=1e-9), row
        assert row["majority_vote"] == pytest.approx(maj, abs=1e-9), row
        assert row["pass_at_k"] == pytest.approx(pak, abs=1e-9), row
    summary = query(store, "SELECT * FROM accuracy_summary WHERE run_id = ?", ["r1"]).row(0, named=True)
    assert summary["generations"] == 12 and summary["sample_accuracy"] == pytest.approx(6 / 12)


def test_no_verdicts_no_accuracy_rows(tmp_path):
    store = Store(str(tmp_path))
    assert query(store, "SELECT count(*) AS n FROM accuracy_at_budget")["n"][0] == 0


def test_report_has_an_accuracy_section_when_verdicts_exist(tmp_path):
    from toa.report import build_report

    store = Store(str(tmp_path / "root"))
    _write_run(store)
    paths = build_report(store, "r1", tmp_path / "report")
    text = paths["markdown"].read_text()
    assert "## Accuracy at budget" in text and "majority_vote" in text
