"""Random sampling and Parallel Ensemble (docs/methods.md §1) on the deterministic in-process
fakes (tests/fakes.py): who is asked, in how many requests, in what order, and how failures
and scores become rows."""

from __future__ import annotations

import asyncio

import pytest
from fakes import AGENTS, FakeGenerate, FakeReward, Q

from toa.methods import MethodContext, get_method
from toa.rows import ERROR, OK, MethodOutput, Prompt

PROMPT_ONLY = [{"role": "user", "content": Q}]


class CountingReward(FakeReward):
    """FakeReward that also counts its calls (an empty call would leave `seen` unchanged)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.calls = 0

    async def __call__(self, texts):
        self.calls += 1
        assert all(isinstance(t, str) for t in texts), texts  # never asked to score a missing text
        return await super().__call__(texts)


def run(name, n=6, agents=AGENTS, gen=None, reward=None) -> tuple[MethodOutput, FakeGenerate, CountingReward]:
    gen, reward = gen or FakeGenerate(), reward or CountingReward()
    ctx = MethodContext(Prompt("p1", Q), tuple(agents), n, gen, reward, 0)
    return asyncio.run(get_method(name).run(ctx)), gen, reward


def raw(text: str) -> float:
    return float(text.rsplit("raw=", 1)[1])


# ---------------------------------------------------------------- random
@pytest.mark.parametrize("n, agents", [(1, ("A",)), (2, ("A", "B", "C")), (6, AGENTS)])
def test_random_draws_n_times_m_from_the_first_agent_in_one_request(n, agents):
    out, gen, _ = run("random", n=n, agents=agents)
    big_n = n * len(agents)
    assert gen.calls == [("A", PROMPT_ONLY, big_n)]  # one request, n=N, the prompt alone
    assert len(out.samples) == big_n
    assert [s.generation.agent for s in out.samples] == ["A"] * big_n
    assert [s.action for s in out.samples] == ["A"] * big_n  # action = the agent name
    assert [s.order for s in out.samples] == list(range(big_n))
    assert all(s.parent_id is None and s.depth == 0 for s in out.samples)
    assert get_method("random").generations(len(agents), n) == big_n


def test_random_uses_the_first_configured_agent_not_the_alphabetically_first():
    out, gen, _ = run("random", n=2, agents=("C", "A", "B"))
    assert [(a, m, k) for a, m, k in gen.calls] == [("C", PROMPT_ONLY, 6)]
    assert {s.action for s in out.samples} == {"C"}


def test_random_scores_every_sample_once_in_generation_order():
    out, _, reward = run("random", n=3)
    texts = [s.generation.text for s in out.samples]
    assert reward.calls == 1 and reward.seen == texts  # one reward call, in generation order
    assert [s.score.value for s in out.samples] == [raw(t) for t in texts]
    assert all(s.score.status == OK for s in out.samples)
    assert [int(t.split("|k=")[1].split("|")[0]) for t in texts] == list(range(1, 13))  # order = generation order


def test_random_keeps_failed_generations_as_error_rows_and_does_not_score_them():
    out, _, reward = run("random", n=2, gen=FakeGenerate(fail_k=frozenset({2, 5})))  # N = 8
    assert len(out.samples) == 8 and [s.order for s in out.samples] == list(range(8))
    failed = [s for s in out.samples if not s.generation.ok]
    assert [s.order for s in failed] == [1, 4]
    for s in failed:
        assert s.generation.status == ERROR and s.generation.text is None and s.action == "A"
        assert s.score.value is None and s.score.status == ERROR  # an error score, not a 0
    assert reward.seen == [s.generation.text for s in out.samples if s.generation.ok]  # 6 texts, no None


def test_random_makes_no_reward_call_when_every_generation_failed():
    out, _, reward = run("random", n=1, agents=("A", "B"), gen=FakeGenerate(fail_k=frozenset({1, 2})))
    assert reward.calls == 0
    assert [(s.generation.status, s.score.value, s.score.status) for s in out.samples] == [(ERROR, None, ERROR)] * 2


def test_random_keeps_a_failed_reward_as_an_error_score():
    out, _, reward = run("random", n=1, agents=("A", "B", "C"), reward=CountingReward(fail_k=frozenset({2})))
    assert [s.score.status for s in out.samples] == [OK, ERROR, OK]
    assert out.samples[1].score.value is None and out.samples[1].generation.ok  # the text is kept
    assert reward.calls == 1


# ---------------------------------------------------------------- parallel ensemble
@pytest.mark.parametrize("n, agents", [(1, ("A",)), (2, ("A", "B", "C")), (6, AGENTS)])
def test_parallel_ensemble_asks_every_agent_for_n_in_one_request_each(n, agents):
    out, gen, _ = run("parallel_ensemble", n=n, agents=agents)
    assert gen.calls == [(a, PROMPT_ONLY, n) for a in agents]  # one request per agent, in agent order
    assert len(out.samples) == n * len(agents)
    assert [s.action for s in out.samples] == [a for a in agents for _ in range(n)]  # grouped in agent order
    assert [s.generation.agent for s in out.samples] == [s.action for s in out.samples]
    assert [s.order for s in out.samples] == list(range(n * len(agents)))
    assert all(s.parent_id is None and s.depth == 0 for s in out.samples)
    assert get_method("parallel_ensemble").generations(len(agents), n) == n * len(agents)


def test_parallel_ensemble_follows_the_configured_agent_order():
    out, gen, _ = run("parallel_ensemble", n=2, agents=("D", "B", "A"))
    assert [a for a, _, _ in gen.calls] == ["D", "B", "A"]
    assert [s.action for s in out.samples] == ["D", "D", "B", "B", "A", "A"]


def test_parallel_ensemble_requests_run_concurrently():
    _, gen, _ = run("parallel_ensemble", n=2)
    assert gen.max_in_flight == len(AGENTS)  # the agents are asked at the same time


def test_parallel_ensemble_scores_every_response_against_the_original_prompt():
    out, gen, reward = run("parallel_ensemble", n=3)
    assert all(messages == PROMPT_ONLY for _, messages, _ in gen.calls)  # nothing but the prompt is sent
    texts = [s.generation.text for s in out.samples]
    assert all("refined=0" in t for t in texts)
    assert reward.calls == 1 and reward.seen == texts  # only the responses, in order: no other prompt scored
    assert [s.score.value for s in out.samples] == [raw(t) for t in texts]
    assert not set(reward.seen) & gen.contents()


def test_parallel_ensemble_keeps_a_failed_generation_as_an_error_row():
    # k counts generations in agent order: 2 = A's second, 3 = B's first
    out, _, reward = run("parallel_ensemble", n=2, agents=("A", "B"), gen=FakeGenerate(fail_k=frozenset({2, 3})))
    assert [(s.action, s.generation.status, s.score.status) for s in out.samples] == [
        ("A", OK, OK), ("A", ERROR, ERROR), ("B", ERROR, ERROR), ("B", OK, OK)]
    assert all(s.score.value is None for s in out.samples if not s.generation.ok)
    assert reward.calls == 1 and len(reward.seen) == 2
