"""step_mcts (step-level MCTS with a verifier) on a deterministic in-process fake generate:
the PUCT rules, priors, budget, continuation requests, waves with virtual loss, failures as
data, and the value_targets rows through the engine's writer and the DuckDB view."""

from __future__ import annotations

import asyncio
import json
import math
from collections import Counter
from dataclasses import replace

import polars as pl
import pytest

from toa.db import query
from toa.engine import _write_outputs
from toa.exports import export_value_targets
from toa.methods import MethodContext, get_method
from toa.methods.step_mcts import (
    StepMCTS,
    StepMCTSOptions,
    StepNode,
    StepTree,
    is_terminal,
    priors,
)
from toa.reward.math_verify import score_one
from toa.rows import ERROR, Generation, Prompt, content_key
from toa.storage import Store

PROMPT = Prompt("p1", "What is 2 + 3?", reference="5")
# (line, mean logprob per token): what the fake proposes as the next step, cycling over the
# slots of one request; "The answer is 5" has no newline: it ends the solution (terminal).
STEPS = [("Add 2 and 3.\n", -0.2), ("Subtract 3 from 2.\n", -1.5), ("Add 2 and 3.\n", -0.2), ("The answer is 5", -0.9)]
TOKENS = 4


class FakeStepGenerate:
    """Deterministic fake of `generate(agent, messages, n, **sampling)`: a step request (it has
    `stop`) gets lines from STEPS by slot; a rollout answers 5 when the state added 2 and 3
    and did not subtract, else -1. Slots count per (agent, messages, sampling), as the real
    request layer does, so a repeated request gets the next lines."""

    def __init__(self, fail_calls: frozenset[int] = frozenset(), logprobs: bool = True):
        self.calls: list[tuple[str, list, int, dict]] = []
        self.slots: Counter = Counter()
        self.fail_calls, self.logprobs = fail_calls, logprobs

    async def __call__(self, agent, messages, n=1, **sampling):
        self.calls.append((agent, messages, n, sampling))
        index = len(self.calls) - 1
        key = (agent, json.dumps(messages), json.dumps(sampling, sort_keys=True))
        first = self.slots[key]
        self.slots[key] += n
        await asyncio.sleep(0)  # let a wave's requests overlap, as a real server would
        state = messages[-1]["content"] if messages[-1]["role"] == "assistant" else ""
        return [self._one(agent, messages, sampling, state, first + i, index) for i in range(n)]

    def _one(self, agent, messages, sampling, state, slot, index) -> Generation:
        sid = content_key(agent, messages, sampling, slot)[:16]
        if index in self.fail_calls:
            return Generation(sid, agent, None, status=ERROR, error="server down")
        if "stop" in sampling:
            text, mean = STEPS[slot % len(STEPS)]
        else:
            good = "Add" in state and "Subtract" not in state
            text, mean = f"So the answer is {5 if good else -1}.", -0.5
        return Generation(sid, agent, text, "stop", 10, TOKENS, 0.01, logprob=mean * TOKENS if self.logprobs else None)

    def rollouts(self):
        return [c for c in self.calls if "stop" not in c[3]]

    def expansions(self):
        return [c for c in self.calls if "stop" in c[3]]


class FakeVerifierReward:
    """Fake of the run's reward: the math verifier itself, so rewards equal the outcomes."""

    async def __call__(self, texts):
        return [score_one(PROMPT, t) for t in texts]


def ctx_for(gen, n=2, agents=("A", "B"), prompt=PROMPT) -> MethodContext:
    return MethodContext(prompt=prompt, agents=agents, n=n, generate=gen, reward=FakeVerifierReward())


def run(method, ctx):
    return asyncio.run(method.run(ctx))


def test_priors_are_a_softmax_of_mean_logprobs_mixed_with_uniform():
    gens = [Generation(str(i), "A", "x", "stop", 1, 2, logprob=lp) for i, lp in enumerate([-0.2, -1.0])]
    p = priors(gens, temperature=1.0, mix=0.0)
    assert p[0] == pytest.approx(1 / (1 + math.exp(-0.4)))  # mean logprobs -0.1 and -0.5
    mixed = priors(gens, temperature=1.0, mix=0.5)
    assert mixed[0] == pytest.approx(0.5 * p[0] + 0.25) and sum(mixed) == pytest.approx(1)
    assert priors(gens, temperature=1e9, mix=0.0) == pytest.approx([0.5, 0.5])
    no_lp = [Generation("a", "A", "x", "stop", 1, 2), gens[0]]
    assert priors(no_lp, 1.0, 0.0) == [0.5, 0.5]  # a server without logprobs: uniform


def test_puct_prefers_prior_when_unvisited_then_value():
    tree = StepTree(StepMCTSOptions(c_puct=1.0))
    tree.root.visits = 4
    low = tree.new(1, tree.root, prior=0.2)
    high = tree.new(1, tree.root, prior=0.8)
    assert tree.best_child(tree.root) is high
    high.visits, high.total = 3, 0.0  # visited and always wrong
    low.visits, low.total = 1, 1.0  # once, right
    assert tree.best_child(tree.root) is low
    assert tree.puct(low, tree.root) == pytest.approx(1.0 + 0.2 * 2 / 2)


def test_terminal_means_eos_not_a_line_end():
    assert is_terminal(Generation("a", "A", "The answer is 5", "stop"))
    assert not is_terminal(Generation("a", "A", "Add.\n", "stop"))
    assert not is_terminal(Generation("a", "A", "Add 2 and", "length"))  # a cut line goes on


def test_search_spends_the_budget_and_learns_the_right_step():
    gen = FakeStepGenerate()
    out = run(get_method("step_mcts", k=4, simulations=8), ctx_for(gen))
    nodes = {n.node_id: n for n in out.nodes}
    root = nodes["n0"]
    assert root.kind == "root" and root.visits == 8  # one backup per simulation, none failed
    firsts = [n for n in out.nodes if n.parent_id == "n0"]
    assert len(firsts) == 3  # 4 samples, "Add 2 and 3." twice: deduplicated into one node
    assert sum(n.visits for n in firsts) == root.visits
    by_kind = {n.kind for n in out.nodes}
    assert by_kind == {"root", "step", "answer"}
    targets = {r.node_id: r for r in out.tables["value_targets"]}
    add = next(n for n in firsts if "Add" in getattr(targets.get(n.node_id), "state", ""))
    sub = next(n for n in firsts if "Subtract" in getattr(targets.get(n.node_id), "state", "Subtract"))
    assert targets[add.node_id].value == 1.0
    assert sub.visits == 0 or targets[sub.node_id].value == 0.0
    assert add.visits > sub.visits  # the search went where the verifier said it is right
    assert all(r.prompt == PROMPT.text and r.visits > 0 for r in targets.values())
    # every generation is a sample: k per expansion, one per rollout
    actions = Counter(s.action for s in out.samples)
    assert actions["rollout"] == len(gen.rollouts()) and actions["rollout"] <= 8
    assert actions["step"] + actions["answer"] == 4 * len(gen.expansions())
    assert [s.order for s in out.samples] == list(range(len(out.samples)))


def test_samples_carry_whole_solutions_and_provenance():
    gen = FakeStepGenerate()
    out = run(get_method("step_mcts", k=4, simulations=6), ctx_for(gen))
    step_ids = {s.generation.sample_id for s in out.samples if s.action == "step"}
    for s in out.samples:
        if s.action == "step":
            assert s.score.status == "skipped" and "\n" in s.generation.text
        else:  # rollout / answer: the whole solution, scored by the run's reward
            assert s.score.ok and "answer is" in s.generation.text
            assert s.score.value == score_one(PROMPT, s.generation.text).value
        assert s.parent_id is None or s.parent_id in step_ids
    rollout = next(s for s in out.samples if s.action == "rollout")
    assert rollout.generation.text.startswith(("Add", "Subtract")) and rollout.depth >= 1


def test_continuation_requests():
    gen = FakeStepGenerate()
    run(get_method("step_mcts", k=2, simulations=3, step_max_tokens=16, rollout_max_tokens=50), ctx_for(gen))
    _, messages, n, sampling = gen.calls[0]
    assert messages == [{"role": "user", "content": PROMPT.text}] and n == 2  # the root: a fresh answer
    assert sampling == {"stop": ["\n"], "include_stop_str_in_output": True, "max_tokens": 16, "logprobs": True}
    later = gen.calls[1]
    assert later[1][-1]["role"] == "assistant" and later[1][-1]["content"].endswith("\n")
    assert later[3]["continue_final_message"] is True and later[3]["add_generation_prompt"] is False
    assert gen.rollouts()[0][3]["max_tokens"] == 50 and "stop" not in gen.rollouts()[0][3]
    # simulation i: agents[i % M] expands (a node visited before) and rolls out
    assert [c[0] for c in gen.calls] == ["A", "A", "B", "B", "A", "A"]


def test_agents_cycle_per_simulation_or_one_is_configured():
    gen = FakeStepGenerate()
    run(get_method("step_mcts", k=2, simulations=4), ctx_for(gen))
    assert {c[0] for c in gen.calls} == {"A", "B"}
    gen = FakeStepGenerate()
    run(get_method("step_mcts", k=2, simulations=4, agent="B"), ctx_for(gen))
    assert {c[0] for c in gen.calls} == {"B"}
    with pytest.raises(ValueError, match="not configured"):
        run(get_method("step_mcts", agent="Z"), ctx_for(FakeStepGenerate()))


def test_terminal_nodes_are_verified_without_a_rollout():
    gen = FakeStepGenerate()
    # optimistic first-play urgency: unvisited steps (the answer among them) get tried
    out = run(get_method("step_mcts", k=4, simulations=20, fpu=1.0, max_depth=2), ctx_for(gen, n=10))
    answers = [n for n in out.nodes if n.kind == "answer"]
    assert answers and all(n.visits == 0 or n.value == 1.0 for n in answers)
    assert len(gen.rollouts()) < 20  # some simulations ended on a verified answer: no generation
    assert out.nodes[0].visits == 20


def test_waves_are_deterministic_and_spread_by_virtual_loss():
    def once(parallel, **opts):
        gen = FakeStepGenerate()
        out = run(get_method("step_mcts", k=4, simulations=8, parallel=parallel, **opts), ctx_for(gen))
        return gen, out

    (gen_a, out_a), (_, out_b) = once(4), once(4)
    assert out_a.nodes == out_b.nodes and [s.generation.sample_id for s in out_a.samples] == \
        [s.generation.sample_id for s in out_b.samples]
    assert out_a.nodes[0].visits == 8
    # wave 1 expands the root once, then its 4 paths spread over the children (virtual loss)
    assert len(gen_a.expansions()[0][1]) == 1 and gen_a.calls[0][1][-1]["role"] == "user"
    wave1 = gen_a.calls[1:4]
    assert all("stop" not in c[3] for c in wave1)  # the wave's rollouts come right after
    assert {c[1][-1]["content"] for c in wave1} == {"Add 2 and 3.\n", "Subtract 3 from 2.\n"}
    no_spread, _ = once(4, virtual_loss=0)  # without it, all four take the top-prior step
    assert {c[1][-1]["content"] for c in no_spread.calls[1:5]} == {"Add 2 and 3.\n"}


def test_failures_are_samples_and_leave_the_tree_alone():
    gen = FakeStepGenerate(fail_calls=frozenset({0}))  # the root expansion fails
    out = run(get_method("step_mcts", k=2, simulations=3), ctx_for(gen))
    failed = [s for s in out.samples if not s.generation.ok]
    assert len(failed) == 2 and all(s.score.status == ERROR for s in failed)
    assert out.nodes[0].visits == 2  # simulation 1 was spent; the others found the tree again
    gen = FakeStepGenerate(fail_calls=frozenset({1}))  # the first rollout fails
    out = run(get_method("step_mcts", k=2, simulations=2), ctx_for(gen))
    assert [s.action for s in out.samples if not s.generation.ok] == ["rollout"]
    assert out.nodes[0].visits == 1


def test_bad_options_and_unverifiable_prompts():
    with pytest.raises(ValueError, match="prior_mix"):
        StepMCTS.from_options({"prior_mix": 2.0})
    with pytest.raises(ValueError, match="simulations"):
        StepMCTS.from_options({"simulations": 0})
    with pytest.raises(ValueError, match=r"unknown option 'c'; known: k, c_puct"):
        StepMCTS.from_options({"c": 1.0})  # a misspelt option is an error, not ignored
    with pytest.raises(ValueError, match="verifiable prompt"):
        run(StepMCTS(), ctx_for(FakeStepGenerate(), prompt=Prompt("p2", "Write a poem.")))


def test_value_targets_are_written_and_queryable(tmp_path):
    out = run(get_method("step_mcts", k=4, simulations=6), ctx_for(FakeStepGenerate()))
    store = Store(str(tmp_path))
    stats = _write_outputs(store, "r1", "step_mcts", "b0", [(PROMPT, out)])
    assert stats.samples == len(out.samples)
    vt = query(store, "select * from value_targets where run_id = ? order by depth, node_id", ["r1"])
    assert vt.height == len(out.tables["value_targets"]) and set(vt["prompt_id"]) == {"p1"}
    assert vt["value"].is_between(0, 1).all() and vt.filter(pl.col("depth") == 0)["visits"][0] == 6
    nodes = query(store, "select count(*) as c from tree_nodes where method = 'step_mcts'")
    assert nodes["c"][0] == len(out.nodes)
    files = export_value_targets(store, "r1", "step_mcts", tmp_path / "export")
    assert pl.read_parquet(files["value_targets.parquet"]).height == vt.height
    assert export_value_targets(store, "r1", "toa", tmp_path / "none") == {}  # no targets, no file


def test_node_row_kinds():
    tree = StepTree(StepMCTSOptions())
    answer = tree.new(1, tree.root, outcome=1.0, state="x")
    answer.visits, answer.total = 2, 2.0
    assert [n.row().kind for n in tree.nodes] == ["root", "answer"]
    assert answer.row().value == 1.0 and answer.row().parent_id == "n0"
    assert StepNode(0, 0).row().value is None  # never visited: no mean, not 0


def test_blank_lines_are_no_steps_unless_nothing_else_came():
    class Blank(FakeStepGenerate):
        def _one(self, agent, messages, sampling, state, slot, index):
            g = super()._one(agent, messages, sampling, state, slot, index)
            blank = "stop" in sampling and (slot % 2 == 0 or self.all_blank)
            return replace(g, text="\n", logprob=-0.1) if blank else g

    gen = Blank()
    gen.all_blank = False
    out = run(get_method("step_mcts", k=2, simulations=1), ctx_for(gen))
    assert [n.kind for n in out.nodes] == ["root", "step"]  # the blank sample is not a node
    assert Counter(s.action for s in out.samples) == {"step": 2, "rollout": 1}
    gen = Blank()
    gen.all_blank = True
    out = run(get_method("step_mcts", k=2, simulations=1), ctx_for(gen))
    assert len(out.nodes) == 2  # all blank: one blank child, so the search goes on
    assert out.tables["value_targets"][1].state == "\n"
