"""benchmarks/search_efficiency.py on a few prompts: its simulated world is deterministic and
content-addressed (docs/methods.md §0.5), its reward reads the hidden quality tag back exactly,
refinements follow the documented rule in each world, every method spends the budget its
`generations()` states (docs/methods.md §0.2), and the script ends with the required line."""

from __future__ import annotations

import asyncio
import importlib.util
import re
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from toa.methods import get_method, method_names
from toa.rows import Prompt
from toa.templates import load

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "search_efficiency.py"
spec = importlib.util.spec_from_file_location("search_efficiency", PATH)
se = importlib.util.module_from_spec(spec)
sys.modules["search_efficiency"] = se  # dataclasses look their module up by name
spec.loader.exec_module(se)

PROMPT = Prompt("s0001", "Simulated prompt 1: answer it well.")
Q = [{"role": "user", "content": PROMPT.text}]
DIFFERING = se.WORLDS["differing"]
LAST_LINE = re.compile(r"toa reaches random best-of-32 reward with (<=|>)?\d+% of the generations")


def texts(world, requests, prompt=PROMPT):
    """Each (agent, messages, n) request asked in turn of one fresh simulated generate."""
    gen = se.SimulatedGenerate(world, prompt)
    return [[g.text for g in asyncio.run(gen(agent, messages, n))] for agent, messages, n in requests], gen


def quality(text: str) -> float:
    return float(se.TAG.search(text).group(1))


def refine(answer: str) -> list[dict]:
    return [{"role": "user", "content": load("refine").render(question=PROMPT.text, answer=answer)}]


# ---------------------------------------------------------------- the world
def test_generate_is_content_addressed_and_deterministic():
    (first, again), gen = texts(DIFFERING, [("A", Q, 3), ("A", Q, 2)])
    assert len(set(first + again)) == 5  # asking again gives the next slots, not the same ones
    assert texts(DIFFERING, [("A", Q, 5)])[0][0] == first + again  # slots 0..4 whatever the split
    assert gen.generations == 5
    other = replace(DIFFERING, seed=1)
    assert texts(other, [("A", Q, 3)])[0][0] != first  # the world seed matters


def test_draws_do_not_depend_on_the_order_requests_are_asked():
    forward, _ = texts(DIFFERING, [("A", Q, 2), ("B", Q, 2)])
    backward, _ = texts(DIFFERING, [("B", Q, 2), ("A", Q, 2)])
    assert forward == backward[::-1]


def test_reward_reads_the_tag_back_exactly():
    (answers,), _ = texts(DIFFERING, [("C", Q, 4)])
    scores = asyncio.run(se.tag_reward(answers + ["no tag here"]))
    assert [s.value for s in scores[:4]] == [quality(t) for t in answers]
    assert [s.value for s in asyncio.run(se.tag_reward(["x [[q=-0.012345]] y"]))] == [-0.012345]
    assert not scores[4].ok and scores[4].value is None  # an untagged text is an error, never 0


def test_refinement_closes_the_documented_share_of_the_gap():
    exact = se.Agent("X", 0.1, 0.0, 0.0, 0.25, 0.0)  # no noise: the rule itself
    world = se.World("exact", (exact,), refine_helps=True, ceiling=0.2)
    difficulty, _ = world.prompt_state(PROMPT.prompt_id)
    (fresh,), _ = texts(world, [("X", Q, 1)])
    assert quality(fresh[0]) == pytest.approx(difficulty + 0.1, abs=1e-6)
    (better,), _ = texts(world, [("X", refine("X answer [[q=0.040000]]"), 1)])
    gap = difficulty + 0.2 - 0.04
    assert quality(better[0]) == pytest.approx(0.04 + 0.25 * gap, abs=1e-6)
    # several responses in one request (MoA): the best of them is refined
    (aggregated,), _ = texts(world, [("X", refine("[[q=0.010000]] and [[q=0.040000]]"), 1)])
    assert quality(aggregated[0]) == pytest.approx(quality(better[0]), abs=1e-6)


def test_no_refine_world_ignores_the_refined_answer():
    exact = se.Agent("X", 0.1, 0.0, 0.0, 0.25, 0.0)
    world = se.World("exact", (exact,), refine_helps=False)
    (fresh, refined), _ = texts(world, [("X", Q, 1), ("X", refine("X answer [[q=0.900000]]"), 1)])
    assert quality(refined[0]) == quality(fresh[0])  # a fresh answer, however good the parent


def test_feedback_is_advice_without_a_quality():
    ask = [{"role": "user", "content": load("feedback").render(question=PROMPT.text, answer="A answer [[q=0.1]]",
                                                               preference="be precise")}]
    (reply,), _ = texts(DIFFERING, [("A", ask, 1)])
    assert se.TAG.search(reply[0]) is None


# ---------------------------------------------------------------- methods and budget
def test_every_registered_method_is_run_or_skipped_with_a_reason():
    run, skipped = se.entries()
    names = {e.name for e in run} | {line.split(":")[0] for line in skipped}
    assert names == set(method_names())
    assert all(get_method(e.name).generations(se.M, se.EQUAL_N) is not None for e in run)
    assert {"random", "parallel_ensemble", "toa"} <= {e.name for e in run}


@pytest.mark.parametrize("n", [1, 3])
def test_every_method_spends_its_budget(n):
    prompts = se.prompts_for(2)
    for entry in se.entries()[0]:
        options, _ = se.options_for(entry, se.M, n)
        best, spent = asyncio.run(se.run_budget(DIFFERING, entry, prompts, n))
        assert spent == [get_method(entry.name, **options).generations(se.M, n)] * 2, entry.name
        assert np.isfinite(best).all(), entry.name


def test_toa_below_its_width_runs_with_width_m():
    toa = se.Entry("toa", "toa", {})
    assert se.options_for(toa, 4, 2) == ({"width": 4}, "width=4 at n=2 (default W < M)")
    assert se.options_for(toa, 4, 3) == ({}, None)


# ---------------------------------------------------------------- statistics and the script
def test_crossing_interpolates_between_budgets():
    gens = np.array([4, 8, 16])
    means = np.array([[0.10, 0.20, 0.30], [0.25, 0.26, 0.27], [0.1, 0.1, 0.1]])
    got = se.crossing(gens, means, np.array([0.15, 0.2, 0.2]))
    assert got[0] == pytest.approx(6.0)  # halfway from 4 to 8
    assert got[1] == 4  # already there at the smallest budget
    assert np.isinf(got[2])  # never reached


def test_main_ends_with_the_required_line(capsys):
    se.main(["--world", "differing", "--prompts", "4", "--boot", "50"])
    out = capsys.readouterr().out.strip().splitlines()
    assert LAST_LINE.fullmatch(out[-1]), out[-1]
    assert out[0] == se.cpu_line()  # the CPU model first
    assert any(line.startswith("skipped optima") for line in out)
    table = {line.split()[0] for line in out if re.match(r"^\S+\s+(<=|>)?\d+%", line)}
    assert table == {e.label for e in se.entries()[0]}  # every method that ran has a row


def test_real_prints_tables_only_once_the_equal_budget_has_run(capsys):
    """--real's order starts at the equal budget, and a stopped run's partial output says what it
    measured (in-process values, no servers: the printing path of run_real)."""
    assert se.parse_args(["--real"]).real_ns == ""
    assert se.real_budgets(2) == [16, 8, 4, 2, 12, 6]  # two agents: the equal budget first
    entries = {e.name: e for e in se.entries()[0]}
    curves = {name: se.Curve(entries[name]) for name in ("random", "toa")}
    args = se.parse_args(["--real", "--boot", "50"])
    ids = [f"p{i}" for i in range(8)]
    se.print_real(curves, {("random", 4): dict.fromkeys(ids, 0.5)}, [], args, 2, [2])
    assert "no table before the equal budget n=16" in capsys.readouterr().out
    per_prompt = {("random", 4): dict.fromkeys(ids, 0.5), ("random", 32): dict.fromkeys(ids, 0.6),
                  ("toa", 32): {i: 0.7 for i in ids[:-1]}}  # toa's run scored one prompt fewer
    for (name, gens) in per_prompt:
        curves[name].ns[gens // 2] = gens
        curves[name].equal = 32
    se.print_real(curves, per_prompt, [], args, 2, [2, 16])
    out = capsys.readouterr().out.strip().splitlines()
    assert "real: 7 prompts scored by every (method, budget)" in out[0]  # the prompts all runs scored
    assert LAST_LINE.fullmatch(out[-1]) and "<=" in out[-1]  # toa beats the target at its smallest budget
