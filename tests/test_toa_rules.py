"""Two rules of TOA's reference mode (docs/methods.md §5; src/toa/methods/toa.py), pinned on small
trees built directly, each so that the rule and its obvious alternative choose differently:

(a) UCB's exploration term uses the GLOBAL play count P (1-based plays so far), not the parent's
    visits (the parent's visits are the `ucb_parent_visits` option, on in improved mode);
(b) the top-k cut keeps the LAST of equal maxima (the later child wins a tie), not the first.
"""

from __future__ import annotations

import asyncio
import math

import pytest
from fakes import FakeGenerate, FakeReward, Q

from toa.methods import MethodContext, get_method
from toa.methods.toa import AGENT, RESPONSE, TOAOptions, Tree
from toa.rows import Generation, Prompt


def gen(i: int, agent: str = "A") -> Generation:
    return Generation(f"s{i}", agent, f"answer {i}", "stop", 1, 1, 0.0)


def reference_tree(agents=("A", "B"), **options) -> Tree:
    return Tree(tuple(agents), TOAOptions(**options), width=len(agents))


# ---------------------------------------------------------------- (a) UCB counts global plays
def response_with_two_visited_children(tree: Tree):
    """A response node R (depth 2) with visits 6, and its two refine agents: X seen once with
    mean 0.5 (visits 2), Y seen 8 times with mean 0.5085 (visits 9). UCB with alpha 0.01:
    with n = 6 (R's visits) Y wins by ~0.0014; with n = P = 40 X wins by ~0.0017."""
    r = tree.attach(tree.root.children[0], gen(1), 0.6)
    x, y = r.children
    assert (x.kind, y.kind) == (AGENT, AGENT)
    r.visits = 6
    x.visits, x.values = 2, [0.5]
    y.visits, y.values = 9, [0.5085] * 8
    return r, x, y


def test_ucb_margins_are_what_the_test_assumes():
    tree = reference_tree()
    _, x, y = response_with_two_visited_children(tree)
    assert tree.ucb(y, 6) - tree.ucb(x, 6) == pytest.approx(0.0014, abs=3e-4)
    assert tree.ucb(x, 40) - tree.ucb(y, 40) == pytest.approx(0.0017, abs=3e-4)
    assert tree.ucb(x, 40) == pytest.approx(0.5 + 0.01 * math.sqrt(2 * math.log(40) / 2))


def test_reference_ucb_uses_the_global_play_count_not_the_parents_visits():
    tree = reference_tree()  # mode="reference": ucb_parent_visits off
    r, x, y = response_with_two_visited_children(tree)
    chosen = tree.best_child(r, plays=40)
    assert chosen is x, (f"reference UCB must use the global play count P=40 (picks X, the less visited), "
                         f"got {'Y' if chosen is y else chosen}: the parent's visits (6) were used")


def test_parent_visits_option_is_the_alternative_rule():
    tree = reference_tree(ucb_parent_visits=True)
    r, _, y = response_with_two_visited_children(tree)
    assert tree.best_child(r, plays=40) is y  # with n = R's 6 visits, the better mean wins


def test_plays_are_counted_from_1_and_failed_plays_count(monkeypatch):
    """P as UCB reads it: play i (0-based) selects with plays = i + 1; a failed play counts."""
    seen = []
    select = Tree.select

    def spy(self, plays):
        seen.append(plays)
        return select(self, plays)

    monkeypatch.setattr(Tree, "select", spy)
    ctx = MethodContext(Prompt("p1", Q), ("A", "B", "C"), 3, FakeGenerate(fail_k=frozenset({4})), FakeReward(), 0)
    out = asyncio.run(get_method("toa").run(ctx))
    assert len(out.samples) == 9
    assert seen == list(range(1, 10)), f"plays passed to selection must be 1-based and count every play, got {seen}"


# ---------------------------------------------------------------- (b) top-k: the last of equal maxima
def agent_with_responses(tree: Tree, rewards: list[float]):
    """The root's first agent node with one response child per reward, in creation order."""
    agent = tree.root.children[0]
    children = [tree.attach(agent, gen(i), v) for i, v in enumerate(rewards)]
    assert all(c.kind == RESPONSE for c in children) and agent.children == children
    return agent, children


@pytest.mark.parametrize("rewards, later", [
    ([0.7, 0.7, 0.5], 1),
    ([0.7, 0.7, 0.5, 0.5], 1),  # where np.argpartition picks index 0 (numpy 2.4)
    ([0.3, 0.9, 0.2, 0.9, 0.9, 0.1], 4),
])
def test_top_1_keeps_the_last_of_equal_maxima(rewards, later):
    tree = reference_tree()
    agent, children = agent_with_responses(tree, rewards)
    chosen = children.index(tree.best_child(agent, plays=10))
    assert chosen == later, (f"top-k tie-break must keep the LAST of equal maxima: rewards {rewards} "
                             f"-> child {later}, got child {chosen}")


def test_top_2_keeps_the_last_two_of_equal_maxima_in_creation_order():
    # three children tie at 0.7 (indices 0, 2, 3): top_k=2 keeps 2 and 3; all are unvisited
    # (UCB +inf), so the first kept one, child 2, is chosen (the first-of-maxima rule: child 0)
    tree = reference_tree(top_k=2)
    agent, children = agent_with_responses(tree, [0.7, 0.5, 0.7, 0.7])
    chosen = children.index(tree.best_child(agent, plays=10))
    assert chosen == 2, f"top_k=2 must keep the last two of equal maxima (children 2, 3), got child {chosen}"
