"""The Optima two-agent dialogue method (toa.methods.optima; speakers' views in toa.dialogue,
datasets in toa.optima_datasets) on deterministic in-process fakes: tree shape and budget, stop
rules, what each speaker sees, the three rewards, provenance rows, and the SFT/DPO builders."""

from __future__ import annotations

import asyncio
import itertools
import json

import polars as pl
import pytest
from fakes import next_sample_id

from toa.dialogue import split_context, view
from toa.methods import MethodContext, get_method
from toa.methods.optima import default_branching
from toa.optima_datasets import build_dialogue_datasets
from toa.rows import (
    ERROR,
    SKIPPED,
    Generation,
    Prompt,
    Score,
    frame,
    sample_row,
)

Q = "Ann has 3 apples. Bob gives her 4 more. How many apples does Ann have?"
PROMPT = Prompt("p1", Q, reference="7")


class FakeDialogueGenerate:
    """Deterministic generate for dialogues. `reply(agent, messages, k)` makes the text of the
    k-th generation (1-based, per fake); token counts and logprobs vary with k so that the
    composite reward differs between dialogues. Records every call with its sampling fields."""

    def __init__(self, reply, fail_k=frozenset()):
        self.reply, self.fail_k = reply, fail_k
        self.k, self.slots, self.calls = 0, {}, []

    async def __call__(self, agent, messages, n=1, **sampling):
        self.calls.append((agent, messages, n, sampling))
        await asyncio.sleep(0)
        return [self._one(agent, messages) for _ in range(n)]

    def _one(self, agent, messages) -> Generation:
        self.k += 1
        sid = next_sample_id(self.slots, agent, messages)
        if self.k in self.fail_k:
            return Generation(sid, agent, None, status=ERROR, error="server down")
        tokens = 4 + self.k % 3
        return Generation(sid, agent, self.reply(agent, messages, self.k), "stop", 10, tokens, 0.01,
                          logprob=-(0.2 + 0.1 * (self.k % 4)) * tokens)


class FakeReward:
    """Fake reward model: the length of the response / 100."""

    def __init__(self):
        self.seen = []

    async def __call__(self, texts):
        self.seen += list(texts)
        return [Score(len(t) / 100) for t in texts]


def changing(agent, messages, k):
    """Solver answers change every time (never agree); the critic never states a number."""
    return "Looks wrong, check the sum." if messages[0]["content"].startswith("You are the critic") else f"3 + 4 ... Answer: {k}"


def steady(agent, messages, k):
    return "Check the addition." if messages[0]["content"].startswith("You are the critic") else f"Answer: {7 if k % 2 else 8}"


def run(reply=changing, n=2, agents=("A", "B"), prompt=PROMPT, fail_k=frozenset(), **options):
    gen, reward = FakeDialogueGenerate(reply, fail_k), FakeReward()
    ctx = MethodContext(prompt, tuple(agents), n, gen, reward, 0)
    return asyncio.run(get_method("optima", **options).run(ctx)), gen, reward


def leaves(out):
    return [s for s in out.samples if s.score.status != SKIPPED]


# ------------------------------------------------------------------------ tree and budget
def test_default_budget_is_n_times_agents_dialogues_in_two_levels():
    assert default_branching(4) == (2, 2) and default_branching(6) == (2, 3) and default_branching(2) == (2,)
    out, gen, _ = run(max_rounds=2)
    dialogues = out.tables["dialogues"]
    assert len(dialogues) == 4 == len(leaves(out))
    assert [c[2] for c in gen.calls[:1]] == [2]  # the 2 first-turn alternatives are one request
    depth = {s.generation.sample_id: s.depth for s in out.samples}
    assert sorted(depth.values()).count(0) == 2 and sorted(depth.values()).count(1) == 4
    assert {d.turns for d in dialogues} == {3} and {d.stop_reason for d in dialogues} == {"max_rounds"}


def test_provenance_actions_parents_and_tree_nodes():
    out, _, _ = run(max_rounds=2)
    ids = {s.generation.sample_id for s in out.samples}
    for s in out.samples:
        role = ("solver", "critic")[s.depth % 2]
        assert s.action == f"{role}_r{s.depth // 2 + 1}"
        assert (s.parent_id is None) == (s.depth == 0) and (s.parent_id is None or s.parent_id in ids)
        assert s.generation.agent == ("A", "B")[s.depth % 2]
    assert [s.order for s in out.samples] == list(range(len(out.samples)))
    root, *nodes = out.nodes
    assert root.kind == "root" and root.visits == 4 and len(nodes) == len(out.samples)
    scored = [s.score.value for s in leaves(out)]
    assert root.value == pytest.approx(sum(scored) / len(scored))
    first_turn = [n for n in nodes if n.depth == 1]
    assert sorted(n.visits for n in first_turn) == [2, 2]  # each first utterance leads to 2 dialogues
    for d in out.tables["dialogues"]:
        path = json.loads(d.utterance_ids)
        assert path[-1] == d.dialogue_id and len(path) == d.turns


def test_rerun_is_identical():
    a, _, _ = run(max_rounds=3)
    b, _, _ = run(max_rounds=3)
    sig = lambda o: [(s.generation.sample_id, s.action, s.parent_id, s.order, s.score) for s in o.samples]
    assert sig(a) == sig(b) and a.nodes == b.nodes and a.tables == b.tables


# ------------------------------------------------------------------------ stop rules
def test_two_agreeing_answers_stop_the_dialogue():
    out, _, _ = run(lambda a, m, k: "No error." if m[0]["content"].startswith("You are the critic") else "Answer: 7",
                    max_rounds=10)
    assert {d.stop_reason for d in out.tables["dialogues"]} == {"agree"}
    assert {d.turns for d in out.tables["dialogues"]} == {3}  # solver, critic, solver
    assert {d.final_answer for d in out.tables["dialogues"]} == {"7.0"}


def test_round_limit_and_critic_never_speaks_last():
    out, _, _ = run(max_rounds=3)
    assert {d.turns for d in out.tables["dialogues"]} == {5}
    assert all(s.action.startswith("solver") for s in leaves(out))


def test_dialogue_token_limit_and_utterance_cap():
    out, gen, _ = run(max_rounds=10, max_dialogue_tokens=9, max_tokens=16)
    assert {d.stop_reason for d in out.tables["dialogues"]} == {"max_dialogue_tokens"}
    assert all(d.tokens >= 9 for d in out.tables["dialogues"])
    assert {json.dumps(c[3]) for c in gen.calls} == {json.dumps({"logprobs": True, "max_tokens": 16})}


def test_a_failed_utterance_ends_its_dialogue_as_an_error_row():
    out, _, _ = run(max_rounds=2, fail_k=frozenset({1}))  # one of the two first-turn alternatives
    rows = out.tables["dialogues"]
    failed = [d for d in rows if d.stop_reason == "error"]
    assert len(failed) == 1 and failed[0].reward is None and failed[0].reward_status == ERROR
    assert "server down" in failed[0].reward_error and len(rows) == 3


# ------------------------------------------------------------------------ who sees what
def test_split_mode_gives_each_speaker_its_half():
    question, first, second = split_context(Q)
    assert question == "How many apples does Ann have?" and first == "Ann has 3 apples." and second == "Bob gives her 4 more."
    out, gen, _ = run(lambda a, m, k: f"I know something. Answer: {k}", mode="split", max_rounds=1, n=1)
    for agent, messages, _, _ in gen.calls:
        intro = messages[0]["content"]
        assert question in intro
        assert (first in intro) == (agent == "A") and (second in intro) == (agent == "B")
    assert {s.action for s in out.samples} == {"a_r1", "b_r1"}


def test_views_alternate_roles_and_merge_the_partner_first_turn():
    turns = [(0, "solver says"), (1, "critic says"), (0, "solver again")]
    solver = view(Q, "critic", 0, turns)
    critic = view(Q, "critic", 1, turns)
    assert [m["role"] for m in solver] == ["user", "assistant", "user", "assistant"]
    assert [m["role"] for m in critic] == ["user", "assistant", "user"]
    assert critic[0]["content"].endswith("solver says") and critic[-1]["content"] == "solver again"


# ------------------------------------------------------------------------ rewards
def test_correctness_reward_checks_the_final_answer():
    out, _, _ = run(steady, reward="correctness", max_rounds=1)
    for s in leaves(out):
        assert s.score.value == (1.0 if "Answer: 7" in s.generation.text else 0.0)


def test_composite_reward_arithmetic():
    out, _, _ = run(reward="composite", max_rounds=2)
    gens = {s.generation.sample_id: s.generation for s in out.samples}
    rows = out.tables["dialogues"]
    t_max = max(d.tokens for d in rows)
    for d in rows:
        path = [gens[i] for i in json.loads(d.utterance_ids)]
        loss = max(-g.logprob / g.completion_tokens for g in path)
        expected = d.correct - 0.5 * d.tokens / t_max + 0.8 / loss
        assert d.reward == pytest.approx(expected) and d.max_loss == pytest.approx(loss)
    assert len({d.reward for d in rows}) > 1


def test_composite_without_logprobs_is_an_error_not_a_number():
    class NoLogprobs(FakeDialogueGenerate):
        def _one(self, agent, messages):
            g = super()._one(agent, messages)
            return Generation(g.sample_id, g.agent, g.text, g.finish_reason, g.prompt_tokens, g.completion_tokens)

    gen = NoLogprobs(changing)
    ctx = MethodContext(PROMPT, ("A", "B"), 1, gen, FakeReward(), 0)
    out = asyncio.run(get_method("optima", max_rounds=1).run(ctx))
    assert all(s.score.status == ERROR and "logprobs" in s.score.error for s in leaves(out))


def test_reward_model_scores_the_final_answers():
    out, _, fake = run(max_rounds=2, reward="reward_model")
    assert len(fake.seen) == len(leaves(out)) == 4
    assert all(s.score.value == pytest.approx(len(s.generation.text) / 100) for s in leaves(out))


def test_no_reference_makes_correctness_an_error():
    out, _, _ = run(prompt=Prompt("p2", Q), reward="correctness", max_rounds=1)
    assert all(s.score.status == ERROR and "no reference" in s.score.error for s in leaves(out))


def test_bad_options_name_the_problem():
    with pytest.raises(ValueError, match=r"optima: mode: Input should be 'critic' or 'split'"):
        get_method("optima", mode="debate")
    with pytest.raises(ValueError, match="optima: speakers must name exactly two agents"):
        get_method("optima", speakers=["A"])
    with pytest.raises(ValueError, match="unknown option 'rounds'; known: mode"):
        get_method("optima", rounds=3)
    with pytest.raises(ValueError, match="branching has 3 levels"):
        get_method("optima", max_rounds=1, branching=[2, 2, 2])
    with pytest.raises(ValueError, match="not configured agents"):
        run(speakers=["A", "Z"])


# ------------------------------------------------------------------------ datasets
def stored(out, method="optima"):
    keys = {"run_id": "r", "method": method, "batch": "b", "prompt_id": PROMPT.prompt_id}
    samples = frame("samples", [sample_row(s, **keys) for s in out.samples])
    dialogues = frame("dialogues", out.table_rows(**keys)["dialogues"])
    prompts = pl.DataFrame({"prompt_id": [PROMPT.prompt_id], "text": [PROMPT.text]})
    return samples, prompts, dialogues


def test_sft_is_the_best_dialogue_one_example_per_speaker():
    out, _, _ = run(max_rounds=2)
    sft, _ = build_dialogue_datasets(*stored(out), margin=0.1)
    best = max(out.tables["dialogues"], key=lambda d: d.reward)
    assert sft.height == 2 and set(sft["agent"]) == {"A", "B"} and set(sft["action"]) == {"solver", "critic"}
    assert set(sft["sample_id"]) == {best.dialogue_id} and set(sft["reward"]) == {best.reward}
    for row in sft.iter_rows(named=True):
        messages = json.loads(row["messages"])
        assert messages[0]["role"] == "user" and messages[-1]["role"] == "assistant"
        assert all(a["role"] != b["role"] for a, b in itertools.pairwise(messages))


def test_dpo_pairs_at_branch_points_respect_the_margin():
    out, _, _ = run(max_rounds=2)
    samples, prompts, dialogues = stored(out)
    _, dpo = build_dialogue_datasets(samples, prompts, dialogues, margin=0.0)
    assert dpo.height >= 1
    by_id = {s.generation.sample_id: s for s in out.samples}
    for row in dpo.iter_rows(named=True):
        chosen, rejected = by_id[row["chosen_id"]], by_id[row["rejected_id"]]
        assert chosen.parent_id == rejected.parent_id and row["chosen_reward"] > row["rejected_reward"]
        context = json.loads(row["prompt_messages"])
        assert context[-1]["role"] == "user" and row["chosen"] == chosen.generation.text
    gaps = dpo["chosen_reward"] - dpo["rejected_reward"]
    _, strict = build_dialogue_datasets(samples, prompts, dialogues, margin=float(gaps.max()) + 1e-9)
    assert strict.height == 0


def test_datasets_hook_picks_the_method_own_datasets():
    from toa.datasets import build_sft, sft_jsonl

    out, _, _ = run(max_rounds=2)
    samples, prompts, dialogues = stored(out)
    generic, _ = get_method("random").datasets(samples, prompts, lambda t: dialogues, rejected_rank=2)
    assert generic.equals(build_sft(samples, prompts))  # the default hook: best vs ranked
    sft, dpo = get_method("optima", dpo_margin=0.0).datasets(samples, prompts, lambda t: dialogues, rejected_rank=2)
    assert sft.height == 2 and dpo.height >= 1
    lines = [json.loads(x) for x in sft_jsonl(sft).splitlines()]
    assert len(lines[0]["messages"]) >= 2 and lines[0]["messages"][-1]["role"] == "assistant"
