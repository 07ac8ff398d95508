"""Self-MoA and Self-MoA-Seq (docs/methods.md §13; arXiv 2502.00674) on the deterministic
in-process fakes of tests/fakes.py: budget, one agent, rounds and windows, provenance,
failures, options and the run config."""

from __future__ import annotations

import asyncio

import pytest

from toa.config import ConfigError, load_config
from toa.methods import MethodContext, get_method
from toa.methods.moa import aggregate_messages
from toa.methods.self_moa import SelfMoA, plan
from toa.rows import ERROR, Generation, MethodOutput, Prompt, content_key

from fakes import AGENTS, Q, FakeGenerate, FakeReward


def run(n=2, agents=AGENTS, seed=0, gen=None, reward=None, **options) -> tuple[MethodOutput, FakeGenerate, FakeReward]:
    gen, reward = gen or FakeGenerate(), reward or FakeReward()
    ctx = MethodContext(Prompt("p1", Q), tuple(agents), n, gen, reward, seed)
    return asyncio.run(get_method("self_moa", **options).run(ctx)), gen, reward


def signature(out: MethodOutput):
    return [(s.generation.sample_id, s.action, s.parent_id, s.depth, s.order, s.score.value) for s in out.samples]


def aggregations(gen: FakeGenerate) -> list[str]:
    """The system message of every aggregate request, in call order."""
    return [messages[0]["content"] for _, messages, _ in gen.calls if messages[0]["role"] == "system"]


def shown(system: str) -> int:
    return system.count("## Response ")


# ---------------------------------------------------------------- budget (§0.2)
@pytest.mark.parametrize("proposals,window", [(2, None), (6, None), (6, 2), (6, 3), (5, 4), (3, 10)])
def test_plan_spends_exactly_the_budget_in_rounds_of_at_most_k(proposals, window):
    for budget in range(2, 200):
        rounds = plan(budget, proposals, window)
        assert sum(sum(steps) + len(steps) for steps in rounds) == budget, budget  # samples + one per step
        for steps in rounds:
            assert 1 <= sum(steps) <= proposals and all(k >= 1 for k in steps), budget  # each step sees a new one
            if window is not None:
                assert steps[0] <= window and all(k <= window - 1 for k in steps[1:]), budget
            else:
                assert len(steps) == 1, budget


def test_plan_shapes():
    assert plan(8, 6, None) == [[3], [3]]  # 7 would leave a lone sample: two rounds of 3 + 1
    assert plan(7, 6, None) == [[6]]  # the paper's Self-MoA: 6 samples, one aggregation
    assert plan(9, 6, 3) == [[3, 2, 1]]  # Seq: 3 samples, then synthesized + 2, then synthesized + 1
    assert plan(4, 6, 2) == [[1, 1]]  # [2, 0] would leave the last step nothing new


@pytest.mark.parametrize("m,n", [(1, 2), (2, 1), (2, 2), (3, 5), (4, 6), (4, 10)])
@pytest.mark.parametrize("window", [None, 2, 3])
def test_budget_is_n_times_m_all_from_one_agent(m, n, window):
    out, gen, reward = run(n=n, agents=AGENTS[:m], window=window)
    assert gen.n_generations == len(out.samples) == n * m
    assert {a for a, _, _ in gen.calls} == {"A"}  # the first configured agent, nothing else
    assert sorted(reward.seen) == sorted(s.generation.text for s in out.samples)  # every output scored
    assert not set(reward.seen) & gen.contents()  # against Q: no aggregate request is scored
    assert all(s.score.value == float(s.generation.text.rsplit("raw=", 1)[1]) for s in out.samples)


def test_chosen_agent_does_everything():
    out, gen, _ = run(n=2, agent="C")
    assert {a for a, _, _ in gen.calls} == {"C"} and {s.generation.agent for s in out.samples} == {"C"}
    assert {s.action for s in out.samples} == {"C_0", "C_1"}


def test_unknown_agent_fails_at_run_naming_the_agents():
    with pytest.raises(ValueError, match=r"self_moa: agent 'Z' is not configured; agents: \['A', 'B', 'C', 'D'\]"):
        run(agent="Z")


def test_one_generation_is_refused():
    with pytest.raises(ValueError, match="at least 2 generations"):
        SelfMoA().check_budget(1, 1)
    SelfMoA().check_budget(1, 2)  # a sample and its aggregation


# ---------------------------------------------------------------- Self-MoA: rounds, provenance
def test_rounds_parents_depth_order():
    out, gen, _ = run(n=2)  # N = 8, K = 6: two rounds of 3 samples + 1 aggregation
    assert gen.calls[0] == ("A", [{"role": "user", "content": Q}], 6)  # every sample in one request
    assert [s.action for s in out.samples] == ["A_0"] * 6 + ["A_1"] * 2
    assert [s.depth for s in out.samples] == [0] * 6 + [1] * 2
    assert [s.order for s in out.samples] == list(range(8))
    for r, agg in enumerate(out.samples[6:]):
        props = out.samples[3 * r: 3 * r + 3]
        assert gen.calls[1 + r][1] == aggregate_messages(Q, [s.generation.text for s in props])  # MoA's request
        assert agg.parent_id == props[0].generation.sample_id  # the first response shown
    assert all(s.parent_id is None for s in out.samples[:6])
    assert gen.max_in_flight == 2  # the rounds' aggregations go out together


def test_no_window_is_a_window_wider_than_a_round():
    assert signature(run(n=4, proposals=4)[0]) == signature(run(n=4, proposals=4, window=4)[0])


def test_deterministic_across_runs():
    for options in ({}, {"window": 2}, {"proposals": 3, "window": 3}):
        first, again = run(n=5, seed=3, **options), run(n=5, seed=3, **options)
        assert signature(first[0]) == signature(again[0]) and first[1].calls == again[1].calls


# ---------------------------------------------------------------- Self-MoA-Seq: the window
@pytest.mark.parametrize("window", [2, 3, 4])
def test_window_caps_what_a_step_sees_and_covers_every_sample(window):
    out, gen, _ = run(n=8, window=window)  # N = 32, rounds of at most 6 samples
    props = [s for s in out.samples if s.depth == 0]
    steps = [s for s in out.samples if s.depth > 0]
    systems = aggregations(gen)
    assert len(systems) == len(steps) and all(1 <= shown(s) <= window for s in systems)
    for p in props:  # every sample is shown to exactly one step
        assert sum(p.generation.text in s for s in systems) == 1
    by_id = {s.generation.sample_id: s for s in out.samples}
    for step, system in zip(steps, systems):
        parent = by_id[step.parent_id]
        assert f"## Response 1:\n{parent.generation.text}" in system  # the parent is the first shown
        # step 1 starts from samples; later steps from the synthesized output, the round's previous step
        assert parent.depth == (step.depth - 1 if step.depth > 1 else 0)


def test_window_walk_of_one_round():
    out, gen, _ = run(n=9, agents=("A",), window=3)  # N = 9 = 6 samples + 3 steps: [3, 2, 1]
    texts = [s.generation.text for s in out.samples]
    systems = aggregations(gen)
    assert systems == [aggregate_messages(Q, texts[0:3])[0]["content"],
                       aggregate_messages(Q, [texts[6], *texts[3:5]])[0]["content"],
                       aggregate_messages(Q, [texts[7], texts[5]])[0]["content"]]
    ids = [s.generation.sample_id for s in out.samples]
    assert [s.parent_id for s in out.samples[6:]] == [ids[0], ids[6], ids[7]]
    assert [s.depth for s in out.samples] == [0] * 6 + [1, 2, 3]


# ---------------------------------------------------------------- failures (§0.6)
def test_failed_sample_is_a_row_left_out_of_the_aggregation():
    out, gen, reward = run(n=9, agents=("A",), window=3, gen=FakeGenerate(fail_k=frozenset({1, 5})))
    assert len(out.samples) == 9 and gen.n_generations == 9
    failed = [out.samples[0], out.samples[4]]
    assert all(s.generation.status == ERROR and s.score.value is None for s in failed)  # never 0
    systems = aggregations(gen)
    assert shown(systems[0]) == 2 and "|k=1|" not in systems[0]
    assert shown(systems[1]) == 2 and "|k=5|" not in systems[1]  # synthesized + the one that worked
    assert out.samples[6].parent_id == out.samples[1].generation.sample_id  # first shown: sample 2
    assert len(reward.seen) == 7


def test_failed_step_keeps_the_last_synthesized_output():
    out, gen, _ = run(n=9, agents=("A",), window=3, gen=FakeGenerate(fail_k=frozenset({8})))  # step 2 fails
    step1, step2, step3 = out.samples[6:]
    assert step2.generation.status == ERROR and step2.parent_id == step1.generation.sample_id
    assert step3.parent_id == step1.generation.sample_id  # synthesized output is still step 1's
    assert aggregations(gen)[2].count(step1.generation.text) == 1 and shown(aggregations(gen)[2]) == 2


def test_step_with_nothing_to_show_answers_q_alone():
    out, gen, _ = run(n=9, agents=("A",), window=3, gen=FakeGenerate(fail_k=frozenset({1, 2, 3})))
    assert gen.calls[1][1] == [{"role": "user", "content": Q}]  # step 1: its whole window failed
    step1, step2 = out.samples[6], out.samples[7]
    assert step1.parent_id is None and step1.depth == 1 and step1.generation.ok
    assert step2.parent_id == step1.generation.sample_id  # step 1's answer becomes the synthesized output


# ---------------------------------------------------------------- identical requests, slots (§0.5, §3.1)
class SameTextFakeGenerate(FakeGenerate):
    """Every reply is the same text (a temperature-0 server), so the rounds send identical
    aggregate requests; round 0's first step (call 1) yields longest, so with rounds running
    freely round 1 would ask for step 2 first and take its slot 0."""

    async def __call__(self, agent, messages, n):
        sid = [next_id(self.slots, agent, messages) for _ in range(n)]  # slots reserved on asking
        self.calls.append((agent, messages, n))
        for _ in range(20 if len(self.calls) == 2 else 1):
            await asyncio.sleep(0)
        return [Generation(s, agent, "same|k=0|refined=0|raw=0.5", "stop", 1, 1) for s in sid]


def next_id(slots, agent, messages):
    key = content_key(agent, messages)
    slots[key] = slots.get(key, -1) + 1
    return content_key(agent, messages, slots[key])[:16]


def test_identical_requests_get_slots_in_round_order():
    gen = SameTextFakeGenerate()
    out, _, _ = run(n=5, agents=("A", "B"), gen=gen, proposals=3, window=2)  # 2 rounds: 3 samples, steps [2, 1]
    steps = out.samples[6:]  # step 1 of rounds 0 and 1, then step 2 of rounds 0 and 1
    assert [s.depth for s in steps] == [1, 1, 2, 2]
    messages = gen.calls[1][1]  # same texts everywhere: every step asks this one request
    assert all(call[1] == messages for call in gen.calls[1:])
    # slots in (step, round) order whatever the timing: free-running rounds would swap 2 and 3
    assert [s.generation.sample_id for s in steps] == [content_key("A", messages, k)[:16] for k in range(4)]


# ---------------------------------------------------------------- options and the run config
def test_bad_options_have_the_one_error_style():
    with pytest.raises(ValueError, match=r"^self_moa: unknown option 'x'; known: agent, proposals, window$"):
        get_method("self_moa", x=1)
    with pytest.raises(ValueError, match=r"^self_moa: window: Input should be greater than or equal to 2"):
        get_method("self_moa", window=1)
    with pytest.raises(ValueError, match=r"^self_moa: proposals: Input should be greater than or equal to 2"):
        get_method("self_moa", proposals=1)


def endpoint(alias):
    return {"alias": alias, "endpoint": {"base_url": "http://127.0.0.1:1/v1", "model": "m"}}


def test_self_moa_validates_through_the_run_config():
    cfg = load_config(overrides={"methods": ["self_moa"], "method_options": {"self_moa": {"agent": "gemma3", "window": 3}}})
    method = cfg.method_objects["self_moa"]
    assert isinstance(method, SelfMoA) and (method.options.agent, method.options.window) == ("gemma3", 3)
    assert method.generations(2, cfg.n) == 2 * cfg.n
    with pytest.raises(ConfigError, match="method_options.self_moa: unknown option 'windw'"):
        load_config(overrides={"methods": ["self_moa"], "method_options": {"self_moa": {"windw": 3}}})
    with pytest.raises(ConfigError, match="methods: self_moa needs at least 2 generations"):
        load_config(overrides={"methods": ["self_moa"], "n": 1, "agents": [endpoint("a")]})
