"""AB-MCTS-A (`ab_mcts`, docs/methods.md §14; arXiv 2503.04412) on the deterministic in-process
fakes of tests/fakes.py (FakeGenerate / FakeReward: reply k of a prompt has raw reward
base[agent] + 0.05 if refined + ((k*37 mod 11) - 5)/100, base A > B > C > D)."""

from __future__ import annotations

import asyncio
import math
import random
from collections import Counter
from dataclasses import asdict

import pytest
from fakes import AGENTS, BASE, FakeGenerate, FakeReward, Q

from toa.methods import MethodContext, get_method, method_names
from toa.methods.ab_mcts import Posterior, Prior, thompson
from toa.rows import ERROR, Generation, MethodOutput, Prompt, frame, sample_row
from toa.templates import load
from toa.treeview import render_text


def run(n=4, agents=("A", "B"), seed=0, gen=None, reward=None, **options) -> tuple[MethodOutput, FakeGenerate, FakeReward]:
    gen, reward = gen or FakeGenerate(), reward or FakeReward()
    ctx = MethodContext(Prompt("p1", Q), tuple(agents), n, gen, reward, seed)
    return asyncio.run(get_method("ab_mcts", **options).run(ctx)), gen, reward


def plays(out: MethodOutput) -> list[tuple[str, int | None]]:
    """(agent, order of the refined sample or None for a new answer to Q), per play."""
    order = {s.generation.sample_id: s.order for s in out.samples}
    return [(s.generation.agent, None if s.parent_id is None else order[s.parent_id]) for s in out.samples]


def signature(out: MethodOutput):
    return ([(s.generation.sample_id, s.action, s.parent_id, s.depth, s.order, s.score.value) for s in out.samples],
            out.nodes)


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# ---------------------------------------------------------------- registration, budget (§0.2)
def test_registered():
    assert "ab_mcts" in method_names()


@pytest.mark.parametrize("n, agents, batch", [(1, ("A",), 1), (3, ("A", "B"), 1), (6, AGENTS, 1), (6, AGENTS, 5),
                                              (5, ("A", "B", "C"), 4)])
def test_budget_is_exactly_n_times_m(n, agents, batch):
    out, gen, reward = run(n, agents, batch=batch)
    assert len(out.samples) == gen.n_generations == n * len(agents)
    assert [s.order for s in out.samples] == list(range(n * len(agents)))
    assert sorted(reward.seen) == sorted(s.generation.text for s in out.samples)  # scored vs Q: the reply only
    assert not set(reward.seen) & gen.contents()


def test_single_llm_uses_the_first_agent_for_the_whole_budget():
    out, gen, _ = run(n=5, agents=AGENTS, multi_llm=False)
    assert len(out.samples) == 20 and {a for a, _, _ in gen.calls} == {"A"}


# ---------------------------------------------------------------- the search (§14.1)
# Checked by hand: an independent list-based trace (posteriors recomputed from value lists with the
# closed-form normal-inverse-chi-squared update, same RNG) printed every draw of seed 3:
#   play 0: root has no child -> GEN; agents A -1.057, B 0.194 -> B answers Q
#   play 1: root GEN 0.276 > CONT -0.018 -> B answers Q again (wider)
#   play 2: root CONT 0.922 > GEN 0.405; children n1 0.172 > n2 -0.322; n1 has no child -> A refines play 0
#   play 3: root CONT; n1; n1 GEN 0.394 > CONT -0.245 -> A refines play 0 (wider at depth 1)
#   play 4: root CONT; n1; n1 GEN -> B refines play 0
#   play 5: root CONT; n2 0.343 > n1 -0.303; n2 has no child -> B refines play 1
#   play 6: root CONT; n1; n1 GEN -> A refines play 0
#   play 7: root CONT; n1; n1 CONT 2.178 > GEN 1.185; n3 (play 2) 0.449 wins -> A refines play 2 (deeper)
PINNED_SEED_3 = [("B", None), ("B", None), ("A", 0), ("A", 0), ("B", 0), ("B", 1), ("A", 0), ("A", 2)]


def test_choices_are_pinned_for_a_seed():
    out, _, _ = run(n=4, agents=("A", "B"), seed=3)
    assert plays(out) == PINNED_SEED_3
    assert [s.action for s in out.samples][:3] == ["B_answer", "B_answer", "A_refine"]


def trace(seed: int, agents: tuple[str, ...], n_plays: int) -> list[tuple[str, int | None]]:
    """An independent oracle of docs/methods.md §14.1 on the fakes: value lists per arm, the conjugate
    update written out from the lists, draws from the same seeded RNG in the documented order."""
    rng = random.Random(f"{seed}:p1:ab_mcts")

    def draw(obs):
        n, mean = len(obs), (sum(obs) / len(obs) if obs else 0.0)
        kappa, nu = 1.0 + n, 1.0 + n
        m = n * mean / kappa
        tau2 = (0.1 + sum((x - mean) ** 2 for x in obs) + n * mean ** 2 / kappa) / nu
        var = (nu * tau2 / 2) / rng.gammavariate(nu / 2, 1.0)
        return rng.normalvariate(m, math.sqrt(var / kappa))

    def best(lists):
        draws = [draw(o) for o in lists]
        return max(range(len(draws)), key=lambda i: (draws[i], -i))

    nodes = [{"parent": None, "play": None, "gen": [], "cont": [], "own": [], "kids": []}]
    by_agent = {a: [] for a in agents}
    out = []
    for k in range(1, n_plays + 1):
        node = nodes[0]
        while node["kids"] and best([node["gen"], node["cont"]]) == 1:
            node = nodes[node["kids"][best([nodes[c]["own"] for c in node["kids"]])]]
        agent = agents[best([by_agent[a] for a in agents])] if len(agents) > 1 else agents[0]
        refined = node["play"] is not None
        v = sigmoid(round(BASE[agent] + (0.05 if refined else 0) + ((k * 37 % 11) - 5) / 100, 6) / 0.1)
        out.append((agent, node["play"]))
        nodes.append({"parent": node, "play": k - 1, "gen": [], "cont": [], "own": [v], "kids": []})
        node["kids"].append(len(nodes) - 1)
        by_agent[agent].append(v)
        node["gen"].append(v)
        up = node
        while up is not None:
            up["own"].append(v)
            if up["parent"] is not None:
                up["parent"]["cont"].append(v)
            up = up["parent"]
    return out


@pytest.mark.parametrize("seed", range(4))
def test_search_equals_an_independent_trace(seed):
    out, _, _ = run(n=5, agents=("A", "B", "C"), seed=seed)
    assert plays(out) == trace(seed, ("A", "B", "C"), 15)


def test_trace_oracle_agrees_with_the_hand_check():
    assert trace(3, ("A", "B"), 8) == PINNED_SEED_3


def test_thompson_favours_the_better_agent_over_many_plays():
    """100 plays over A > B > C > D (base rewards 0.10 .. -0.05): A gets most plays, for every seed."""
    for seed in range(5):
        counts = Counter(a for a, _ in plays(run(n=25, agents=AGENTS, seed=seed)[0]))
        assert counts["A"] >= 60 and counts["A"] > 2 * max(counts[b] for b in "BCD"), (seed, counts)
        assert sum(counts.values()) == 100


def test_thompson_picks_the_arm_with_the_better_posterior():
    prior, rng = Prior(), random.Random(0)
    good, bad = Posterior(prior), Posterior(prior)
    for _ in range(20):
        good.add(0.8)
        bad.add(0.5)
    wins = sum(thompson([bad, good], rng) == 1 for _ in range(1000))
    assert wins >= 990
    # an untried arm (the prior) still gets explored against a mediocre one
    fresh = Posterior(prior)
    tries = sum(thompson([bad, fresh], rng) == 1 for _ in range(1000))
    assert 50 < tries < 500


def test_refinements_go_deeper_when_they_score_higher():
    """The fakes add 0.05 to every refinement: the tree goes below depth 1; with refinements that
    score 1.0 lower it stays wide (answers to Q) almost everywhere."""
    deep, _, _ = run(n=10, agents=AGENTS)
    assert max(s.depth for s in deep.samples) >= 3
    wide, _, _ = run(n=10, agents=AGENTS, reward=FakeReward(refine_penalty=1.0))
    assert sum(s.depth == 1 for s in wide.samples) > 3 * sum(s.depth == 1 for s in deep.samples)


def test_prompts_are_q_or_refine_of_the_parent():
    out, gen, _ = run(n=5, agents=("A", "B", "C"))
    by_id = {s.generation.sample_id: s for s in out.samples}
    for (agent, messages, n), s in zip(gen.calls, out.samples):
        assert n == 1 and agent == s.generation.agent and len(messages) == 1
        if s.parent_id is None:
            assert messages == [{"role": "user", "content": Q}] and s.action == f"{agent}_answer" and s.depth == 1
        else:
            parent = by_id[s.parent_id]
            text = load("refine").render(question=Q, answer=parent.generation.text)
            assert messages == [{"role": "user", "content": text}]
            assert s.action == f"{agent}_refine" and s.depth == parent.depth + 1


# ---------------------------------------------------------------- posteriors (§14.2)
def test_gaussian_draw_is_the_conjugate_posterior():
    obs = [0.2, 0.9, 0.4, 0.4, 0.7]
    p = Posterior(Prior(m=0.1, kappa=2.0, nu=3.0, tau_square=0.2))
    for v in obs:
        p.add(v)
    n, mean = len(obs), sum(obs) / len(obs)
    kappa, nu = 2.0 + n, 3.0 + n
    m = (2.0 * 0.1 + n * mean) / kappa
    tau2 = (3.0 * 0.2 + sum((x - mean) ** 2 for x in obs) + n * 2.0 * (0.1 - mean) ** 2 / kappa) / nu
    rng = random.Random(7)
    expected = rng.normalvariate(m, math.sqrt((nu * tau2 / 2) / rng.gammavariate(nu / 2, 1.0) / kappa))
    assert p.draw(random.Random(7)) == pytest.approx(expected, rel=1e-12)
    draws = [p.draw(rng) for _ in range(4000)]
    assert sum(draws) / len(draws) == pytest.approx(m, abs=0.02)  # E[mu] = m_n


def test_beta_draw_is_the_conjugate_posterior():
    p = Posterior(Prior(dist="beta", a=0.5, b=0.5))
    for v in (1.0, 0.0, 1.0, 0.25):
        p.add(v)
    assert p.draw(random.Random(1)) == pytest.approx(random.Random(1).betavariate(0.5 + 2.25, 0.5 + 1.75), rel=1e-9)


# ---------------------------------------------------------------- rows (§14.3)
def test_tree_rows_are_consistent():
    out, _, _ = run(n=10, agents=AGENTS)
    nodes = {n.node_id: n for n in out.nodes}
    samples = {s.generation.sample_id: s for s in out.samples}
    root = out.nodes[0]
    assert (root.kind, root.parent_id, root.depth, root.sample_id) == ("root", None, 0, None)
    held = out.nodes[1:]
    assert all(n.kind == "response" for n in held)
    assert sorted(n.sample_id for n in held) == sorted(samples)  # every sample is in a node, once
    assert [n.created for n in out.nodes] == list(range(len(out.nodes)))
    v = {n.node_id: sigmoid(samples[n.sample_id].score.value / 0.1) for n in held}
    below = {nid: [nid] for nid in nodes}
    for n in reversed(held):  # children come after their parent: collect subtrees bottom-up
        below[n.parent_id] += below[n.node_id]
    for n in held:
        parent, s = nodes[n.parent_id], samples[n.sample_id]
        assert parent.created < n.created and parent.depth == n.depth - 1 == s.depth - 1
        assert s.parent_id == parent.sample_id and n.agent == s.generation.agent
        assert n.visits == n.n_values == len(below[n.node_id])
        assert n.value == pytest.approx(sum(v[m] for m in below[n.node_id]) / n.n_values)
    assert root.n_values == root.visits == 40 and root.value == pytest.approx(sum(v.values()) / 40)


def test_tree_draws_with_the_tree_viewer():
    """The kinds used (root, response) are ones toa.treeview draws: every node is a line, one ★."""
    out, _, _ = run(n=3, agents=("A", "B"))
    keys = {"run_id": "r1", "method": "ab_mcts", "batch": "b0"}
    samples = frame("samples", [sample_row(s, prompt_id="p1", **keys) for s in out.samples])
    nodes = frame("tree_nodes", [{**asdict(n), **keys, "prompt_id": "p1"} for n in out.nodes])
    lines = render_text(nodes, samples).splitlines()
    assert len(lines) == len(out.nodes) == 7 and lines[0].startswith("n0 root")
    assert sum("response" in line for line in lines) == 6 and sum("★" in line for line in lines) == 1


# ---------------------------------------------------------------- determinism, replay (§0.5, §0.7)
def test_two_runs_are_identical_and_ignore_global_rng():
    first = signature(run(n=6, agents=AGENTS, seed=5)[0])
    random.seed(123)
    random.random()
    assert signature(run(n=6, agents=AGENTS, seed=5)[0]) == first
    assert signature(run(n=6, agents=AGENTS, seed=6)[0]) != first


def test_a_rerun_replays_the_tree_up_to_where_the_first_run_failed():
    """Choices depend on seed + rewards only: a run whose calls failed from play 6 on (a crash) asked
    exactly the same slots for plays 0-5 as the rerun that completes."""
    crashed, _, _ = run(n=6, agents=AGENTS, gen=FakeGenerate(fail_k=frozenset(range(7, 25))))
    complete, _, _ = run(n=6, agents=AGENTS)
    head = lambda out: [(s.generation.sample_id, s.action, s.parent_id) for s in out.samples[:6]]
    assert head(crashed) == head(complete)
    assert all(s.generation.status == ERROR for s in crashed.samples[6:])


class ShuffledFakeGenerate(FakeGenerate):
    """FakeGenerate whose replies come back in a different order on each run: the reply text and
    slot are fixed when the call is made, then the call yields a run-dependent number of times."""

    def __init__(self, delays: random.Random, **kw):
        super().__init__(**kw)
        self.delays = delays

    async def __call__(self, agent, messages, n):
        self.calls.append((agent, messages, n))
        replies = [self._one(agent, messages) for _ in range(n)]
        for _ in range(self.delays.randrange(5)):
            await asyncio.sleep(0)
        return replies


def test_batched_plays_do_not_depend_on_timing():
    outs = [run(n=6, agents=AGENTS, batch=3, gen=ShuffledFakeGenerate(random.Random(i)))[0] for i in range(3)]
    assert signature(outs[0]) == signature(outs[1]) == signature(outs[2])
    assert [p for _, p in plays(outs[0])[:3]] == [None, None, None]  # the first batch sees the empty tree


# ---------------------------------------------------------------- failures (§0.6)
def test_failures_spend_the_play_and_leave_the_tree():
    gen, reward = FakeGenerate(fail_k=frozenset({2, 7})), FakeReward(fail_k=frozenset({5}))
    out, _, _ = run(n=5, agents=AGENTS, gen=gen, reward=reward)
    assert len(out.samples) == 20 and gen.n_generations == 20
    failed = [s for s in out.samples if not s.score.ok]
    assert len(failed) == 3 and all(s.score.value is None for s in failed)  # never 0
    assert sum(s.generation.status == ERROR for s in failed) == 2
    assert len(reward.seen) == 18  # a failed generation is not scored
    held = {n.sample_id for n in out.nodes if n.kind == "response"}
    assert held == {s.generation.sample_id for s in out.samples if s.score.ok}
    assert out.nodes[0].n_values == 17
    assert all(s.parent_id in held for s in out.samples if s.parent_id)  # nothing refines a failure


def test_every_play_failing_still_spends_the_budget():
    out, _, reward = run(n=3, agents=("A", "B"), gen=FakeGenerate(fail_k=frozenset(range(1, 7))))
    assert len(out.samples) == 6 and not reward.seen
    assert [n.kind for n in out.nodes] == ["root"] and out.nodes[0].value is None
    assert all(s.parent_id is None for s in out.samples)


# ---------------------------------------------------------------- options
def test_beta_and_normalisations_run_within_budget():
    for options in ({"dist": "beta"}, {"normalize": "standardize"}, {"dist": "beta", "normalize": "standardize"},
                    {"normalize": "none"}, {"prior_m": 0.5, "prior_tau_square": 0.01}):
        out, gen, _ = run(n=5, agents=("A", "B", "C"), **options)
        assert len(out.samples) == gen.n_generations == 15, options
        assert 0.0 <= out.nodes[0].value <= 1.0 or options.get("normalize") == "none"


def test_beta_with_raw_values_outside_0_1_is_an_error():
    out, _, _ = run(n=3, dist="beta", normalize="none", reward=FakeReward(offset=0.5))  # raw in [0.4, 0.7]
    assert len(out.samples) == 6
    with pytest.raises(ValueError, match=r"ab_mcts: value .* outside \[0, 1\]"):
        run(n=3, dist="beta", normalize="none", reward=FakeReward(offset=-1.0))


@pytest.mark.parametrize("options, message", [
    ({"widht": 3}, r"^ab_mcts: unknown option 'widht'; known: variant, multi_llm, dist"),
    ({"variant": "m"}, r"^ab_mcts: variant: 'm' \(AB-MCTS-M\) is not implemented"),
    ({"variant": "b"}, r"^ab_mcts: variant: 'b': must be 'a'"),
    ({"dist": "poisson"}, r"^ab_mcts: dist: "),
    ({"prior_kappa": 0}, r"^ab_mcts: prior_kappa: "),
    ({"normalize": "minmax"}, r"^ab_mcts: normalize: "),
    ({"batch": 0}, r"^ab_mcts: batch: "),
])
def test_bad_options_are_one_style_of_error(options, message):
    with pytest.raises(ValueError, match=message):
        get_method("ab_mcts", **options)


def test_batch_not_below_the_budget_is_refused_at_config_time():
    method = get_method("ab_mcts", batch=8)
    with pytest.raises(ValueError, match=r"^ab_mcts: batch 8 is not below the budget n \* M = 8"):
        method.check_budget(4, 2)
    method.check_budget(3, 3)  # 8 < 9: fine
    get_method("ab_mcts").check_budget(1, 1)  # batch 1 always works


def test_generation_texts_are_what_the_reward_saw():
    out, _, _ = run(n=4, agents=AGENTS)
    assert all(isinstance(s.generation, Generation) for s in out.samples)
    assert all(s.score.value == float(s.generation.text.rsplit("raw=", 1)[1]) for s in out.samples)
