"""TOA with several simulations of one tree in flight (docs/methods.md §5.12) and Sequential
Refine's concurrent chains (§3.1), on deterministic in-process fakes: reproducible whatever the
timing, the budget kept exactly, the virtual loss gone once its simulation ends, the option in
the run id, reference mode refusing it."""

from __future__ import annotations

import asyncio
import random

import pytest
from fakes import AGENTS, FakeGenerate, FakeReward, Q, next_sample_id

from toa.config import load_config
from toa.methods import MethodContext, get_method
from toa.methods import toa as toa_module
from toa.methods.sequential_refine import chain_order
from toa.plan import run_id
from toa.rows import ERROR, Generation, MethodOutput, Prompt, content_key


class FakeJitterGenerate:
    """A fake generate whose replies depend only on the request and its slot (as the request
    layer's records do), never on timing, while each call sleeps a delay drawn from `jitter`:
    two jitters give two completion orders of the same calls. `greedy`: the reply ignores the
    slot (a temperature-0 server), so identical requests get identical texts. `fail_calls`:
    0-based call indices (in the order asked, which is deterministic) that fail."""

    def __init__(self, jitter: int, greedy: bool = False, prompt: str = Q, fail_calls: frozenset[int] = frozenset()):
        self.jitter, self.greedy, self.prompt, self.fail_calls = jitter, greedy, prompt, fail_calls
        self.slots, self.calls = {}, []
        self.in_flight = self.max_in_flight = 0

    async def __call__(self, agent, messages, n):
        assert n == 1
        self.calls.append((agent, messages, n))
        failed = len(self.calls) - 1 in self.fail_calls
        sid = next_sample_id(self.slots, agent, messages)  # reserved at call time, like PromptGenerate
        slot = 0 if self.greedy else self.slots[content_key(agent, messages)]
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        await asyncio.sleep(random.Random(f"{self.jitter}:{sid}").random() * 0.004)
        self.in_flight -= 1
        refined = messages != [{"role": "user", "content": self.prompt}]
        content = content_key(agent, messages) if self.greedy else sid
        raw = round(int(content[:6], 16) / 0xFFFFFF - 0.5, 6)
        if failed:
            return [Generation(sid, agent, None, status=ERROR, error="server down")]
        text = f"{agent}|k={slot}|refined={int(refined)}|raw={raw}"
        return [Generation(sid, agent, text, "stop", 10, 5, 0.01)]


def run(name, gen, n=10, agents=AGENTS, reward=None, seed=0, **options) -> MethodOutput:
    ctx = MethodContext(Prompt("p1", Q), tuple(agents), n, gen, reward or FakeReward(), seed)
    return asyncio.run(get_method(name, **options).run(ctx))


def signature(out: MethodOutput):
    return ([(s.generation.sample_id, s.action, s.parent_id, s.depth, s.order, s.score.value) for s in out.samples],
            out.nodes)


PARALLEL = {"mode": "improved", "parallel": 4}


# ---------------------------------------------------------------- options, validation, run id
def test_reference_mode_refuses_parallel_in_one_line():
    with pytest.raises(ValueError, match=r"^toa: parallel: 4 simulations at once need mode = 'improved'") as err:
        get_method("toa", parallel=4)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="parallel"):
        load_config(overrides={"methods": ["toa"], "n": 3, "method_options": {"toa": {"parallel": 2}}})
    with pytest.raises(ValueError, match=r"toa: parallel: "):
        get_method("toa", mode="improved", parallel=0)
    assert get_method("toa", parallel=1).options.parallel == 1  # the sequential search is fine


def test_parallel_enters_the_run_id_and_the_default_equals_not_setting_it():
    def rid(**toa):
        return run_id(load_config(overrides={"methods": ["toa"], "n": 3, "method_options": {"toa": toa}}))

    assert rid(mode="improved") == rid(mode="improved", parallel=1)
    assert rid(mode="improved", parallel=4) != rid(mode="improved", parallel=1)
    assert rid(mode="improved", parallel=4, virtual_loss=2.0) != rid(mode="improved", parallel=4)


def test_parallel_1_is_the_sequential_search():
    for options in ({}, {"mode": "improved"}, {"width": 13, "normalize": "standardize"}):
        seq = run("toa", FakeGenerate(), **options)
        assert signature(run("toa", FakeGenerate(), parallel=1, **options)) == signature(seq)
        assert signature(run("toa", FakeGenerate(), parallel=1, virtual_loss=5.0, **options)) == signature(seq)


# ---------------------------------------------------------------- TOA: budget, overlap, determinism
@pytest.mark.parametrize("parallel", [2, 4, 7, 40, 64])
def test_budget_is_exact_with_simulations_in_flight(parallel):
    gen = FakeGenerate()
    out = run("toa", gen, mode="improved", parallel=parallel)
    assert gen.n_generations == 40 == len(out.samples)  # n * M, as with parallel = 1
    assert [s.order for s in out.samples] == list(range(40))
    assert out.nodes[0].visits == 41 and out.nodes[0].n_values == 40
    assert gen.max_in_flight == min(parallel, 40)


def test_simulations_overlap_and_finish_in_another_order_than_they_start():
    gen = FakeJitterGenerate(jitter=1)
    run("toa", gen, **PARALLEL)
    assert gen.max_in_flight == 4


@pytest.mark.parametrize("options", [PARALLEL, {**PARALLEL, "normalize": "standardize"}, {**PARALLEL, "virtual_loss": 0.0},
                                     {**PARALLEL, "parallel": 3, "max_depth": 4, "top_k": 2}])
def test_parallel_search_is_the_same_whatever_the_timing(options):
    outs = [run("toa", FakeJitterGenerate(jitter), **options) for jitter in (1, 2, 3)]
    assert signature(outs[0]) == signature(outs[1]) == signature(outs[2])
    assert signature(outs[0]) == signature(run("toa", FakeJitterGenerate(1), **options))  # and run to run


def test_virtual_loss_is_gone_when_its_simulation_ends(monkeypatch):
    trees, seen_pending = [], []

    class SpyTree(toa_module.Tree):
        def __init__(self, *args):
            super().__init__(*args)
            trees.append(self)

        def select(self, plays):
            seen_pending.append(self.root.pending)
            return super().select(plays)

    monkeypatch.setattr(toa_module, "Tree", SpyTree)
    out = run("toa", FakeJitterGenerate(jitter=5, fail_calls=frozenset({3, 17})), **PARALLEL)
    assert max(seen_pending) == 3  # selected while 3 others were in flight
    assert all(node.pending == 0 for node in trees[0].nodes)
    # every visit is a real one: 1 to start, +1 per value backed up (prior copies included)
    assert all(row.visits == 1 + row.n_values for row in out.nodes)
    ok = sum(1 for s in out.samples if s.score.ok)
    assert out.nodes[0].visits == 1 + ok and ok == 38  # failed plays leave no visit either


def test_virtual_loss_spreads_the_selections_of_one_window():
    actions = lambda out: [s.action for s in out.samples[:4]]
    assert actions(run("toa", FakeGenerate(), **PARALLEL)) == ["A_layer_1", "B_layer_1", "C_layer_1", "D_layer_1"]
    stacked = run("toa", FakeGenerate(), **PARALLEL, virtual_loss=0.0)
    assert actions(stacked) == ["A_layer_1"] * 4  # unvisited A stays +inf: the window piles on it
    assert len({s.generation.sample_id for s in stacked.samples}) == 40  # distinct slots, not one sample 4 times


def test_a_failing_play_cancels_the_plays_in_flight():
    class Boom(FakeJitterGenerate):
        async def __call__(self, agent, messages, n):
            if len(self.calls) == 5:
                raise RuntimeError("boom")
            return await super().__call__(agent, messages, n)

    with pytest.raises(RuntimeError, match="boom"):
        run("toa", Boom(jitter=1), **PARALLEL)


# ---------------------------------------------------------------- Sequential Refine (§3.1)
def test_sequential_chains_get_the_same_slots_whatever_the_timing():
    """Two agents, 6 chains: chains share orders, and a temperature-0 server answers identical
    requests identically, so identical refine requests go out concurrently; their slots (and so
    which chain gets which sample) must not depend on which earlier call returned first."""
    orders = [tuple(chain_order(MethodContext(Prompt("p1", Q), ("A", "B"), 6, None, None, 0), k)) for k in range(6)]
    assert len(set(orders)) < len(orders)  # the collision this test is about
    outs = [run("sequential_refine", FakeJitterGenerate(jitter, greedy=True), n=6, agents=("A", "B"))
            for jitter in range(1, 6)]
    assert all(signature(out) == signature(outs[0]) for out in outs)
    assert len({s.generation.sample_id for s in outs[0].samples}) == 12


def test_sequential_chains_overlap():
    gen = FakeJitterGenerate(jitter=1)
    out = run("sequential_refine", gen, n=5)
    assert gen.max_in_flight == 5 and len(out.samples) == 20
