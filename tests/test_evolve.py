"""Unit tests of prompt evolution (toa.evolve): metrics (Python and the SQL view agree),
seeded importance-weighted selection, cleaning and filters, evolution chains on an in-process
fake rewriter, and mixing."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import re

import pytest
from helpers import sample_row_dict

from toa import templates
from toa.db import query
from toa.evolve import (
    FAILED,
    KEPT,
    REJECTED,
    EvolveConfig,
    clean_rewrite,
    draw_kinds,
    evolve_prompts,
    informativeness,
    mix,
    reject_reason,
    select_informative,
)
from toa.rows import ERROR, Generation, Prompt, PromptRow, content_key
from toa.storage import Store

# --- metrics ----------------------------------------------------------------------------------

def test_informativeness_metrics():
    m = informativeness([0.2, 0.9, 0.5, 0.9])
    assert m["mean"] == pytest.approx(0.625)
    assert m["variance"] == pytest.approx(((0.2 - .625) ** 2 + 2 * (0.9 - .625) ** 2 + (0.5 - .625) ** 2) / 4)
    assert m["max_min"] == pytest.approx(0.7)
    assert m["max_mean"] == pytest.approx(0.275)
    assert m["best_minus_second"] == 0.0  # the top two are tied
    assert informativeness([0.4]) == {"mean": 0.4, "variance": 0.0, "max_min": 0.0, "max_mean": 0.0,
                                      "best_minus_second": 0.0}
    with pytest.raises(ValueError):
        informativeness([])


def _sample(run_id, prompt_id, i, reward, status="ok", reward_status="ok"):
    return sample_row_dict(run_id=run_id, method="random", batch="b", prompt_id=prompt_id, sample_id=f"{prompt_id}-{i}",
                           order=i, agent="a", action="a", depth=0, text="t", status=status,
                           reward=reward, reward_status=reward_status, prompt_tokens=1, completion_tokens=1)


def test_sql_view_matches_python(tmp_path):
    store = Store(str(tmp_path))
    rewards = {"p1": [0.1, 0.7, 0.3], "p2": [-0.5, 0.2], "p3": [0.4]}
    rows = [_sample("r1", p, i, r) for p, rs in rewards.items() for i, r in enumerate(rs)]
    rows.append(_sample("r1", "p1", 9, None, status="error", reward_status="error"))  # not scored: ignored
    store.write_rows("samples", rows, "run=r1", "method=random", "b.parquet")
    got = query(store, "SELECT * FROM prompt_informativeness WHERE run_id = ? ORDER BY prompt_id", ["r1"])
    assert got["prompt_id"].to_list() == ["p1", "p2", "p3"]
    for row in got.iter_rows(named=True):
        want = informativeness(rewards[row["prompt_id"]])
        for name, value in want.items():
            assert row[name] == pytest.approx(value, abs=1e-12), (row["prompt_id"], name)


# --- selection --------------------------------------------------------------------------------

def test_selection_is_seeded_and_sized():
    metric = {f"p{i}": i / 10 for i in range(20)}
    a = select_informative(metric, 0.25, seed=3)
    assert len(a) == 5 and a == select_informative(dict(reversed(metric.items())), 0.25, seed=3)
    assert len({tuple(select_informative(metric, 0.25, seed=s)) for s in range(10)}) > 1  # the seed matters
    assert len(select_informative({"a": 1.0}, 0.25, seed=0)) == 1  # min_selected
    assert select_informative({"a": float("nan"), "b": None}, 0.5, seed=0) == []


def test_selection_is_importance_weighted():
    # one prompt carries almost all the weight: it is picked in (nearly) every seed
    metric = {"hot": 1.0, **{f"cold{i}": 0.001 for i in range(9)}}
    hits = sum("hot" in select_informative(metric, 0.1, seed=s) for s in range(200))
    assert hits >= 190
    # negative metrics (a mean reward) are shifted, not rejected
    neg = select_informative({"a": -0.9, "b": -0.1, "c": -0.5}, 0.34, seed=1)
    assert len(neg) == 1


# --- cleaning and filters ---------------------------------------------------------------------

CFG = EvolveConfig()


@pytest.mark.parametrize("raw,want", [
    ("New prompt: Explain tides to a child.", "Explain tides to a child."),
    ("**Rewritten Prompt:** \"Explain tides.\"", "Explain tides."),
    ("```\nWrite a haiku about rain.\n```", "Write a haiku about rain."),
    ("Describe the water cycle in three steps.\n\nAnswer: Water evaporates...", "Describe the water cycle in three steps."),
    (None, ""),
])
def test_clean_rewrite(raw, want):
    assert clean_rewrite(raw) == want


@pytest.mark.parametrize("text,reason", [
    ("", "empty"),
    ("Why?", "too short"),
    ("x" * 3000, "too long"),
    ("I'm sorry, but I can't help with rewriting that.", "refusal"),
    ("explain  why the sky is BLUE.", "copy of the parent"),
    ("Explain why the sky is blue!", "near copy"),
    ("I'd be up for transforming your original question into a harder one.", "talks about the rewrite"),
    ("Here is the rewritten prompt: list three causes of tides.", "talks about the rewrite"),
    ("Compare Rayleigh and Mie scattering for a sunset over the ocean.", None),
])
def test_reject_reason(text, reason):
    got = reject_reason(text, "Explain why the sky is blue.", CFG)
    assert (got is None) if reason is None else got.startswith(reason)


# --- evolution on a fake rewriter -------------------------------------------------------------

class FakeRewriter:
    """In-process stand-in for the request layer: a rewrite reply names the instruction kind it
    was given and the call count; scripted replies (by call number) test the filters."""

    def __init__(self, scripted: dict[int, str | None] | None = None):
        self.calls, self.scripted = [], scripted or {}

    def for_prompt(self, prompt_id):
        async def generate(agent, messages, n=1, **sampling):
            self.calls.append((prompt_id, agent, messages, sampling))
            k = len(self.calls)
            content = messages[0]["content"]
            if k in self.scripted:
                text = self.scripted[k]
            elif "## Original prompt" in content:
                kind = next(name for name in templates.EVOLVE_NAMES
                            if templates.load(name).text.split("\n")[0] in content)
                text = f"New prompt: {kind.split('_')[1]} task number {k} about {prompt_id}, with reasons."
            else:
                text = f"Reference answer {k}."
            if text is None:
                return [Generation(f"key{k}", agent, None, status=ERROR, error="server down")]
            await asyncio.sleep(0)
            return [Generation(content_key(k)[:16], agent, text, "stop", 10, 5)]
        return generate


PROMPTS = [Prompt("p1", "Explain why the sky is blue.", "Rayleigh scattering."),
           Prompt("p2", "Write a haiku about autumn.", "Leaves fall..."),
           Prompt("p3", "What is 12 times 3?", "36")]


def test_chains_record_provenance_and_references():
    cfg = EvolveConfig(evolutions=3)
    fake = FakeRewriter()
    evo = asyncio.run(evolve_prompts(PROMPTS[:2], PROMPTS, fake.for_prompt, "a", cfg, iteration=1))
    assert len(evo.steps) == 6 and all(s.status == KEPT for s in evo.steps)
    for root in ("p1", "p2"):
        chain = [s for s in evo.steps if s.root_prompt_id == root]
        assert [s.step for s in chain] == [1, 2, 3]
        assert chain[0].parent_prompt_id == root
        assert [s.parent_prompt_id for s in chain[1:]] == [s.prompt_id for s in chain[:-1]]
        assert chain[-1].kinds == ">".join(draw_kinds(cfg, root, 1))
        assert all(s.reference and s.reference.startswith("Reference answer") for s in chain)
    rewrite_calls = [c for c in fake.calls if "## Original prompt" in c[2][0]["content"]]
    assert all(c[3] == {"temperature": 1.0, "max_tokens": 256} for c in rewrite_calls)
    assert len(fake.calls) == 12  # 6 rewrites + 6 references
    assert [p.prompt_id for p in evo.prompts] == [s.prompt_id for s in evo.steps]
    assert not re.search(r"New prompt", evo.prompts[0].text)


def test_rejections_failures_and_duplicates_are_rows():
    cfg = EvolveConfig(evolutions=2, reference="none")
    # calls alternate between the chains: 1 = p1 step 1, 2 = p2 step 1, 3 = p1 step 2, 4 = p2 step 2
    fake = FakeRewriter({1: "I'm sorry, I cannot do that.", 2: "Describe a rainbow to a child, step by step.",
                         3: "Describe a rainbow to a CHILD, step by step.", 4: None})
    evo = asyncio.run(evolve_prompts(PROMPTS[:2], PROMPTS, fake.for_prompt, "a", cfg, iteration=1))
    by_call = {s.call_key: s for s in evo.steps}
    statuses = sorted((s.root_prompt_id, s.step, s.status, s.reason) for s in evo.steps)
    assert ("p1", 1, REJECTED, "refusal") in statuses
    assert any(s.status == FAILED and s.reason == "server down" for s in evo.steps)
    dup = [s for s in evo.steps if s.reason == "duplicate"]
    # p1 comes first in selection order, so its copy is kept and p2's is the duplicate
    assert [(s.root_prompt_id, s.step) for s in dup] == [("p2", 1)] and dup[0].prompt_id is None
    assert [p.text for p in evo.prompts] == ["Describe a rainbow to a CHILD, step by step."]
    assert len(by_call) == 4
    assert evo.failed == 1
    # the refused step leaves the chain on its root: the next step rewrites the root
    p1 = sorted((s for s in evo.steps if s.root_prompt_id == "p1"), key=lambda s: s.step)
    assert p1[1].parent_prompt_id == "p1"


def test_failed_reference_makes_the_step_an_error():
    cfg = EvolveConfig(evolutions=1)
    fake = FakeRewriter({2: None})  # call 1 rewrites, call 2 is the reference
    evo = asyncio.run(evolve_prompts(PROMPTS[:1], PROMPTS, fake.for_prompt, "a", cfg, iteration=1))
    assert evo.steps[0].status == FAILED and evo.steps[0].reason.startswith("reference call failed")
    assert evo.prompts == [] and evo.failed == 1


def test_config_fingerprint_has_template_hashes():
    fp = EvolveConfig().fingerprint()
    assert set(fp["templates"]) == set(templates.EVOLVE_NAMES)
    assert EvolveConfig(metric="variance").fingerprint() != fp
    with pytest.raises(ValueError):
        EvolveConfig(metric="nope")


# --- mixing -----------------------------------------------------------------------------------

def test_mix_ratio_and_seed():
    originals = [Prompt(f"o{i}", f"original {i}") for i in range(10)]
    evolved = [Prompt(f"e{i}", f"evolved {i}") for i in range(4)]
    half = mix(originals, evolved, 0.5, seed=1)
    assert len(half) == 8 and half[-4:] == evolved and half == mix(originals, evolved, 0.5, seed=1)
    assert mix(originals, evolved, 1.0, seed=1) == evolved
    assert len(mix(originals, evolved, 0.2, seed=1)) == 14  # too few originals: all of them
    assert mix(originals, [], 0.5, seed=1) == originals
    assert math.isclose(sum(p.prompt_id.startswith("e") for p in half) / len(half), 0.5)


# --- the stage's storage (model calls replaced by the fake rewriter) ---------------------------

def test_run_step_writes_provenance_and_next_set_then_replays(tmp_path, monkeypatch):
    import json

    import toa.evolve as ev
    from toa.config import load_config
    from toa.prompts import load_prompts

    cfg_run = load_config(None, {"results_root": str(tmp_path)})
    store = Store(str(tmp_path))
    prompts = [Prompt(f"p{i}", f"Prompt number {i}: explain topic {i} to a student.", f"ref {i}", "src.jsonl", i + 1)
               for i in range(4)]
    store.write_rows("prompts", [PromptRow(**dataclasses.asdict(p), batch="b") for p in prompts], "source=s1", "b.parquet")
    store.write_rows("samples", [_sample("r0", p.prompt_id, i, 0.1 * i * (j + 1))
                                 for j, p in enumerate(prompts) for i in range(3)], "run=r0", "method=random", "b.parquet")
    fake = FakeRewriter()

    def fake_layer(store, run_cfg, cfg, key, agent, endpoints, selected, current, iteration, metric):
        return asyncio.run(evolve_prompts(selected, current, fake.for_prompt, agent, cfg, iteration, metric)), len(fake.calls)

    monkeypatch.setattr(ev, "_evolve_with_layer", fake_layer)
    cfg = EvolveConfig(fraction=0.5, evolutions=2)
    out = ev.run_step(cfg_run, cfg, "e1", 1, "r0", "s1", endpoints=None)
    assert (out["selected"], out["evolved"], out["steps"], out["calls_made"]) == (2, 4, 4, 8)
    assert out["prompts"] == 8  # 4 evolved + 4 originals at evolved_share 0.5
    rows = query(store, "SELECT * FROM evolutions WHERE evolve_id = 'e1'")
    assert rows.height == 4 and set(rows["from_run_id"]) == {"r0"} and set(rows["metric"]) == {"max_min"}
    assert set(rows["agent"]) == {cfg_run.agents[0].alias}
    # the selection follows the metric: p3 has the widest reward spread
    assert "p3" in set(rows["root_prompt_id"])
    loaded, _ = load_prompts(out["path"])
    assert {p.prompt_id for p in loaded} >= set(rows["prompt_id"]) and len(loaded) == 8
    assert all(p.reference for p in loaded)
    with open(out["path"], encoding="utf-8") as fh:
        assert json.loads(fh.readline())["id"] == "p0"  # originals keep their ids
    again = ev.run_step(cfg_run, cfg, "e1", 1, "r0", "s1", endpoints=None)
    assert again["calls_made"] == 0 and len(fake.calls) == 8 and again["path"] == out["path"]
    assert ev.step_done(store, "e1", 1, "r0") and not ev.step_done(store, "e1", 1, "other-run")
