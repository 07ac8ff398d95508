"""Sampling methods on deterministic in-process fakes (docs/methods.md §1-§6), including the TOA
conformance vectors (a) and (c) of docs/methods.md §5.11 as exact tests."""

from __future__ import annotations

import asyncio
import re

import pytest

from toa.methods import MethodContext, get_method
from toa.methods.sequential_refine import chain_order
from toa.rows import ERROR, MethodOutput, Prompt
from toa import templates

from fakes import AGENTS, BASE, Q, FakeGenerate, FakeReward  # noqa: F401

MINE = ["prs", "prs_feedback", "sequential_refine", "moa", "toa", "self_moa", "ab_mcts"]


def run(name, n=6, agents=AGENTS, seed=0, gen=None, reward=None, **options) -> tuple[MethodOutput, FakeGenerate, FakeReward]:
    gen, reward = gen or FakeGenerate(), reward or FakeReward()
    ctx = MethodContext(Prompt("p1", Q), tuple(agents), n, gen, reward, seed)
    return asyncio.run(get_method(name, **options).run(ctx)), gen, reward


def signature(out: MethodOutput):
    return ([(s.generation.sample_id, s.action, s.parent_id, s.depth, s.order, s.score.value) for s in out.samples],
            out.nodes)


def responses(out):
    return [s for s in out.samples if not s.action.endswith("_feedback")]


# ---------------------------------------------------------------- every method
@pytest.mark.parametrize("name", MINE)
def test_budget_is_n_times_m(name):
    out, gen, _ = run(name)
    assert len(responses(out)) == 6 * 4
    assert gen.n_generations == 6 * 4 + (1 if name == "prs_feedback" else 0)  # feedback: one extra call


@pytest.mark.parametrize("name", MINE)
def test_reward_sees_exactly_the_generated_texts(name):
    out, gen, reward = run(name)
    assert sorted(reward.seen) == sorted(s.generation.text for s in responses(out))
    assert not set(reward.seen) & gen.contents()  # no refine / aggregate / feedback prompt is scored
    assert all(s.score.value == float(s.generation.text.rsplit("raw=", 1)[1]) for s in responses(out))


@pytest.mark.parametrize("name", MINE)
def test_same_seed_same_output(name):
    assert signature(run(name, seed=3)[0]) == signature(run(name, seed=3)[0])


@pytest.mark.parametrize("name", MINE)
def test_provenance_is_consistent(name):
    out, _, _ = run(name)
    ids = [s.generation.sample_id for s in out.samples]
    assert len(set(ids)) == len(ids)
    assert sorted(s.order for s in out.samples) == list(range(len(out.samples)))
    order_of = {s.generation.sample_id: s.order for s in out.samples}
    for s in out.samples:
        assert s.parent_id is None or order_of[s.parent_id] < s.order  # parents come first


# ---------------------------------------------------------------- PRS (§2)
def test_prs_layers_and_parent():
    out, gen, _ = run("prs", n=3, agents=("A", "B", "C"))  # N = 9: N0 = 4, N1 = 5
    layer0, layer1 = out.samples[:4], out.samples[4:]
    assert [s.action for s in out.samples] == ["A_layer_0"] * 4 + ["A_layer_1"] * 5
    values = [s.score.value for s in layer0]
    y_star = layer0[values.index(max(values))]
    assert all(s.parent_id == y_star.generation.sample_id and s.depth == 1 for s in layer1)
    assert all(s.parent_id is None and s.depth == 0 for s in layer0)
    assert {a for a, _, _ in gen.calls} == {"A"}  # single agent: the first configured
    refine_prompt = gen.calls[-1][1][0]["content"]
    assert refine_prompt.endswith(y_star.generation.text) and Q in refine_prompt


def test_prs_feedback_call():
    out, gen, _ = run("prs_feedback", n=2, agents=("A", "B"))  # N = 4
    assert [s.action for s in out.samples] == ["A_layer_0"] * 2 + ["A_feedback"] + ["A_layer_1"] * 2
    fb = out.samples[2]
    assert fb.score.value is None and fb.score.status == "skipped" and fb.parent_id == out.samples[3].parent_id
    feedback_prompt, refine_prompt = gen.calls[1][1][0]["content"], gen.calls[2][1][0]["content"]
    assert templates.load("preference").text in feedback_prompt
    assert fb.generation.text in refine_prompt


def test_prs_single_sample_and_no_y_star():
    out, gen, _ = run("prs", n=1, agents=("A",))
    assert [s.action for s in out.samples] == ["A_layer_0"]
    out, gen, reward = run("prs", n=2, agents=("A", "B"), gen=FakeGenerate(fail_k=frozenset({1, 2})))
    assert len(out.samples) == 2 and all(s.score.value is None for s in out.samples)  # never 0
    assert reward.seen == []


# ---------------------------------------------------------------- Sequential refine (§3)
def test_sequential_chains():
    out, gen, _ = run("sequential_refine", n=5, seed=7)
    ctx = MethodContext(Prompt("p1", Q), AGENTS, 5, gen, None, 7)
    for k in range(5):
        chain = out.samples[4 * k: 4 * k + 4]
        assert [s.generation.agent for s in chain] == chain_order(ctx, k)
        assert sorted(chain_order(ctx, k)) == sorted(AGENTS)
        assert [s.action for s in chain] == [f"{a}.round_{4 * k}_iter_{j}" for j, a in enumerate(chain_order(ctx, k))]
        assert [s.depth for s in chain] == [0, 1, 2, 3]
        assert [s.parent_id for s in chain] == [None] + [s.generation.sample_id for s in chain[:-1]]
    assert gen.max_in_flight == 5  # chains run concurrently


def test_sequential_refines_previous_and_seed_matters():
    out, gen, _ = run("sequential_refine", n=1)
    prompts = [messages[0]["content"] for _, messages, _ in gen.calls]
    assert prompts[0] == Q
    for prev, prompt in zip(out.samples, prompts[1:]):
        assert prompt.endswith(prev.generation.text)
    perms = lambda seed: [s.generation.agent for s in run("sequential_refine", n=8, seed=seed)[0].samples]
    assert perms(1) == perms(1) and perms(1) != perms(2)


def test_sequential_failed_step_refines_last_success():
    out, _, _ = run("sequential_refine", n=1, gen=FakeGenerate(fail_k=frozenset({2})))
    assert out.samples[1].generation.status == ERROR and out.samples[1].score.value is None
    assert out.samples[2].parent_id == out.samples[0].generation.sample_id


# ---------------------------------------------------------------- MoA (§4)
def test_moa_layers_and_aggregation():
    out, gen, _ = run("moa", n=6)  # n_iter 4: layers 0 1 2 3 | 0 1
    layers = [0, 1, 2, 3, 0, 1]
    assert [s.action for s in out.samples] == [f"{a}_{l}" for l in layers for a in AGENTS]
    assert [s.depth for s in out.samples] == [l for l in layers for _ in AGENTS]
    for r, layer in enumerate(layers):
        calls = gen.calls[4 * r: 4 * r + 4]
        assert [a for a, _, _ in calls] == list(AGENTS)
        messages = calls[0][1]
        if layer == 0:
            assert messages == [{"role": "user", "content": Q}]
            assert all(s.parent_id is None for s in out.samples[4 * r: 4 * r + 4])
            continue
        prev = out.samples[4 * (r - 1): 4 * r]
        system, question = messages
        assert system["role"] == "system" and question == {"role": "user", "content": Q}
        assert system["content"].startswith(templates.load("aggregate").text.split("{")[0])
        blocks = "\n\n".join(f"## Response {i}:\n{s.generation.text}" for i, s in enumerate(prev, 1))
        assert system["content"].endswith(blocks)  # agent order, responses last
        assert [s.parent_id for s in out.samples[4 * r: 4 * r + 4]] == [s.generation.sample_id for s in prev]
    assert gen.max_in_flight == 4  # a layer's M generations go out together


def test_moa_last_stack_cut_short_and_failures_left_out():
    out, _, _ = run("moa", n=7, n_iter=3)
    assert [s.depth for s in out.samples[::4]] == [0, 1, 2, 0, 1, 2, 0]
    out, gen, _ = run("moa", n=2, gen=FakeGenerate(fail_k=frozenset({2})))
    system = gen.calls[4][1][0]["content"]
    assert "## Response 3:" in system and "## Response 4:" not in system and "|k=2|" not in system
    assert out.samples[5].parent_id is None  # B's own response failed: nothing of its own aggregated


# ---------------------------------------------------------------- TOA (§5)
def short(out):
    return [s.action.replace("_layer_", "") + ("*" if s.parent_id else "") for s in out.samples]


def per_depth(out, depths=(2, 4, 6)):
    return [sum(1 for n in out.nodes if n.kind == "response" and n.depth == d) for d in depths]


VECTOR_A = ("A1 B1 C1 D1 A1 A1 A1 A1 A1 A1 A1 A1 A1 | A3* B3* C3* D3* A3* A3* A3* A3* A3* A3* A3* A3* A3* | "
            "A5* B5* C5* D5* A5* A5* A5* A5* A5* A5* A5* A5* A5* A5*").replace("| ", "").split()
VECTOR_C = "A1 B1 C1 D1 A1 B1 C1 D1 A1 B1 C1 D1 A1".split() + \
    ["A3*"] * 4 + ["B3*"] * 4 + ["C3*"] * 4 + ["D3*"] * 4 + ["A3*"] * 4 + ["B3*"] * 4 + ["C3*"] * 3


def vector(reward=None, **options):
    return run("toa", n=10, reward=reward, **{"width": 13, "tau": 0.1, "alpha": 0.01, "top_k": 1, **options})[0]


def test_toa_conformance_vector_a():
    out = vector()
    assert short(out) == VECTOR_A
    values = [s.score.value for s in out.samples]
    best = values.index(max(values))
    assert (best, out.samples[best].action, values[best]) == (18, "A_layer_3", 0.20)
    assert out.nodes[0].kind == "root" and out.nodes[0].visits == 41
    assert per_depth(out) == [13, 13, 14]


def test_toa_conformance_vector_c():
    out = vector(reward=FakeReward(constant=0.0))
    assert short(out) == VECTOR_C
    assert per_depth(out) == [13, 27, 0]


@pytest.mark.parametrize("reward", [None, 0.0, -1.0])
def test_toa_incremental_width_equals_tree_walk(reward):
    fake = lambda: FakeReward(constant=reward)
    fast, slow = vector(fake(), incremental_width=True), vector(fake(), incremental_width=False)
    assert signature(fast) == signature(slow)


def test_toa_samples_and_tree():
    out = vector()
    by_id = {s.generation.sample_id: s for s in out.samples}
    for play, s in enumerate(out.samples):
        agent, layer = s.action.split("_layer_")
        assert s.order == play and s.depth == int(layer) + 1 and agent == s.generation.agent
        assert s.parent_id is None or by_id[s.parent_id].depth == s.depth - 2
    nodes = {n.node_id: n for n in out.nodes}
    assert [n.created for n in out.nodes] == list(range(len(out.nodes)))
    assert all(n.parent_id is None or nodes[n.parent_id].created < n.created for n in out.nodes)
    kinds = {"root": 0, "agent": 1, "response": 0}
    assert all(n.depth % 2 == kinds[n.kind] for n in out.nodes)
    held = [n for n in out.nodes if n.kind == "response"]
    assert sorted(n.sample_id for n in held) == sorted(by_id)
    assert all(by_id[n.sample_id].depth == n.depth for n in held)
    # a response node passed through has 2M agent children (M refine + M prior copies)
    for n in held:
        children = [c for c in out.nodes if c.parent_id == n.node_id]
        assert len(children) == (8 if n.visits > 1 else 4)


def test_toa_width_below_agents_is_a_clear_error():
    with pytest.raises(ValueError, match=r"width W=2 is smaller than the number of agents M=4"):
        run("toa", n=2)  # default W = floor(4 * 2 / 3) = 2
    with pytest.raises(ValueError, match=r"W=3"):
        run("toa", n=10, width=3)
    out, _, _ = run("toa", n=2, mode="improved")  # improved default: W = max(M, floor(M n / 3))
    assert len(out.samples) == 8


def test_toa_max_depth():
    out = vector(max_depth=4)
    assert len(out.samples) == 40 and max(s.depth for s in out.samples) == 4
    assert not [n for n in out.nodes if n.depth > 4]


def test_toa_refine_cap_bounds_a_never_improving_node():
    def widest(out):  # most response children under an agent node that refines or re-answers
        nodes = {n.node_id: n for n in out.nodes}
        agents = [n for n in out.nodes if n.kind == "agent" and nodes[n.parent_id].kind == "response"]
        return max(sum(1 for c in out.nodes if c.parent_id == a.node_id) for a in agents)

    worse = lambda: FakeReward(refine_penalty=1.0)  # no refinement ever beats its parent
    stuck = vector(worse())
    assert widest(stuck) > 13  # the reference keeps feeding one node past W
    capped = vector(worse(), refine_cap=3)
    assert widest(capped) <= 3 and len(capped.samples) == 40


def test_toa_options_run_within_budget():
    for options in ({"ucb_parent_visits": True}, {"mode": "improved"}, {"top_k": 2}):
        out = vector(**options)
        assert len(out.samples) == 40 and out.nodes[0].visits == 41


def test_toa_standardize_keeps_values_informative_on_a_wide_scale():
    judge = lambda: FakeReward(scale=20.0, offset=5.0)  # rewards from about 2 to 8, like a 1-10 judge
    flat = vector(judge())
    assert all(n.value == 1.0 for n in flat.nodes if n.n_values)  # sigmoid(r / 0.1) saturates: search is blind
    spread = vector(judge(), normalize="standardize")
    assert 0.2 < spread.nodes[0].value < 0.8
    with pytest.raises(ValueError, match="normalize"):
        get_method("toa", normalize="minmax")


def test_toa_failures_spend_the_play_and_leave_the_tree():
    gen, reward = FakeGenerate(fail_k=frozenset({2, 7, 20})), FakeReward(fail_k=frozenset({5, 11}))
    out, _, _ = run("toa", n=10, width=13, gen=gen, reward=reward)
    assert len(out.samples) == 40 and gen.n_generations == 40
    failed = [s for s in out.samples if not s.score.ok]
    assert len(failed) == 5 and all(s.score.value is None for s in failed)  # never 0
    assert sum(1 for s in failed if s.generation.status == ERROR) == 3
    assert len(reward.seen) == 37  # a failed generation is not scored
    held = [n for n in out.nodes if n.kind == "response"]
    assert len(held) == 35 and out.nodes[0].visits == 36 and out.nodes[0].n_values == 35
    assert out.samples[2].action == "B_layer_1"  # play 2 failed (k=2): B is asked again
    assert out.samples[1].action == "B_layer_1"


# ---------------------------------------------------------------- templates (§6)
def test_templates_are_versioned_and_hashed():
    hashes = templates.hashes()
    assert set(hashes) == {"refine", "aggregate", "feedback", "preference"}
    assert all(re.fullmatch(r"[0-9a-f]{16}", h) for h in hashes.values())
    for name in hashes:
        t = templates.load(name)
        assert t.version == "1" and "#:" not in t.text
    refine = templates.load("refine")
    text = refine.render(question="Q?", answer="the answer")
    assert text.endswith("the answer") and "Q?" in text  # variable part last
    assert templates.load("aggregate").render(responses="R").endswith("R")
    assert templates.load("feedback").render(question="q", answer="a", preference="p").endswith("a")
    with pytest.raises(KeyError):
        refine.render(question="Q?")
    with pytest.raises(KeyError):
        refine.render(question="Q?", answer="a", typo="x")


def test_template_sha_covers_the_whole_file():
    a = templates.parse("x", "#: version: 1\n#: fields: q\nHello {q}\n")
    b = templates.parse("x", "#: version: 2\n#: fields: q\nHello {q}\n")
    assert a.text == b.text == "Hello {q}" and a.sha != b.sha
    assert a.render(q="you") == "Hello you"
