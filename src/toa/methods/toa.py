"""TOA: Monte Carlo tree search over agents (docs/methods.md §5; arXiv 2412.17061).

One tree per prompt; node kinds alternate by depth: root (0) -> agent nodes (odd depths) ->
response nodes (even depths) -> agent nodes -> ... An agent node is (agent, response to refine
or None); a response node holds one generation and its value v. Exactly n * M plays, each one
generation and one reward call; every generation becomes a Sample.

Paper settings are the defaults: tau 0.1, alpha 0.01 (ArmoRM), width W = floor(M * n / 3),
top_k 1. `mode="reference"` (default) follows §5 to the letter, including its quirks, and
reproduces the conformance vectors. Options that fix the known weak points (all off in
reference mode; `mode="improved"` turns on the first three, any option can be set by hand):

- ucb_parent_visits: UCB uses the parent's visits instead of the global play count P.
- refine_cap: an agent node under a response node that has absorbed `refine_cap` responses
  without one beating its parent counts as fully expanded (selection moves on below it)
  instead of absorbing samples forever. improved: ceil(W / M).
- width default: improved mode uses max(M, floor(M * n / 3)); an explicit width < M, or a
  default one in reference mode, is a ValueError (the reference crashes on it).
- max_depth: deepest allowed response node (tree depth, >= 2); its agent parents keep sampling
  at that depth instead of descending.
- normalize="standardize": v = sigmoid((raw - mean) / std) over the raw rewards seen so far for
  this prompt (this one included; 0.5 until two distinct rewards exist); tau is not used. For
  rewards whose scale does not suit sigmoid(raw / tau), e.g. a 1-10 judge.
- incremental_width (on in both modes, results unchanged): response nodes are counted per depth
  as they are created instead of by the reference's whole-tree walk per selection step.
- parallel (improved mode only; refused in reference mode): simulations of this one tree in
  flight at once, with a virtual loss (docs/methods.md §5.12). 1 (default) is the sequential
  search, unchanged. A window of `parallel` plays: play i is selected while plays i-k+1..i-1
  are pending, each pending play holding `virtual_loss` visits worth v = 0 on its path (its
  agent node and every ancestor) so that UCB steers the next selections elsewhere; plays are
  started and applied (virtual loss removed, attach, backup) in play order, and the window
  waits for its OLDEST play, never for whichever finished first. So the tree, every request
  and every slot are the same on every run; only the plays' overlap depends on timing.

Decisions where the rules are silent:
- Failed generation or failed score: the play is spent (P still counts it), the Sample is kept
  with its error (the reward is never turned into 0), and the tree is left unchanged: no
  response node, no visits, no values. The next play therefore usually selects the same agent
  node, and the content-addressed generate hands it the next sample slot: a retry.
  A response needs a value to take part (best child, better-than-parent), so one without a
  reward is not attached.
- Prior copies are added once per response node, tracked by a flag; without failures this is
  exactly the reference's `visits == 1` test.
- An agent node with no response children is never fully expanded (there is nothing to
  descend into). In reference mode with W >= M this never changes a result.
- Sample: action `<agent>_layer_<agent node depth>` (as §5), depth = the response node's depth,
  parent_id = sample id of the refined response (None when answering from scratch, prior copies
  included), order = play index.
- TreeNode: every node (root, agent nodes incl. prior copies, response nodes) with final visits,
  mean of backed-up values and their count; node_id "n<creation index>"; a response node's
  agent is the agent that generated it and its sample_id the generation's.
- Ties in the top_k cut: §5's rule, the LAST of equal maxima (later child wins), always. The
  reference calls np.argpartition, which only mostly does that: with numpy 2.4,
  [0.7, 0.7, 0.5, 0.5] gives index 0 (measured), and its choice on ties may change with the
  numpy version or CPU. For top_k > 1 the kept children stay in creation order (the
  reference keeps argpartition's order).
- Arithmetic as in the reference: means with np.mean (pairwise summation), UCB and sigmoid
  with numpy, so that equal-looking scores tie or not exactly as there.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from toa.methods.base import Method, MethodContext, Options, register, score_all, user
from toa.rows import Generation, MethodOutput, Sample, Score, TreeNode
from toa.templates import load

ROOT, AGENT, RESPONSE = "root", "agent", "response"


class TOAOptions(Options):
    mode: Literal["reference", "improved"] = Field("reference", description="reference: the rules to the letter (docs/methods.md §5); improved: ucb_parent_visits, refine_cap and a width of at least M by default.")
    tau: float = Field(0.1, gt=0, description="Temperature of the sigmoid that maps a raw reward to a value v.")
    alpha: float = Field(0.01, ge=0, description="Exploration weight in UCB.")
    width: int | None = Field(None, ge=1, description="Width W: response nodes per depth; None: floor(M * n / 3) (improved: at least M).")
    top_k: int = Field(1, ge=1, description="Children kept by the top-k cut before UCB.")
    normalize: Literal["sigmoid", "standardize"] = Field("sigmoid", description="Raw reward -> v: sigmoid(raw / tau), or sigmoid of the z-score over this prompt's rewards so far.")
    ucb_parent_visits: bool | None = Field(None, description="UCB counts the parent's visits instead of the global play count; None: on in improved mode only.")
    refine_cap: int | None = Field(None, ge=1, description="Responses an agent node absorbs without beating its parent before it counts as fully expanded; None: off (improved: ceil(W / M)).")
    max_depth: int | None = Field(None, ge=2, description="Deepest response node (tree depth; first responses are at 2).")
    incremental_width: bool = Field(True, description="Count response nodes per depth as they are created (same results, no whole-tree walk).")
    parallel: int = Field(1, ge=1, description="Simulations of one prompt's tree in flight at once (docs/methods.md §5.12); 1: the sequential search. More than 1 needs mode = 'improved'.")
    virtual_loss: float = Field(1.0, ge=0, description="Visits, each worth v = 0, that a simulation in flight adds to every node on its path so that concurrent selections spread out; 0: they stack on one node. Used only with parallel > 1.")

    @model_validator(mode="after")
    def _reference_is_sequential(self) -> TOAOptions:
        if self.parallel > 1 and self.mode == "reference":
            raise ValueError(f"parallel: {self.parallel} simulations at once need mode = 'improved'; reference mode "
                             f"is the paper's sequential search (docs/methods.md §5.12)")
        return self


@dataclass(eq=False)
class Node:
    """One tree node. `values` are the backed-up values; `reward` is a response node's own v."""

    created: int
    kind: str
    depth: int
    parent: Node | None = field(default=None, repr=False)
    agent: str | None = None
    refine: Generation | None = None  # agent node: the response it refines (None: from scratch)
    generation: Generation | None = None  # response node: what it holds
    reward: float | None = None  # response node: v = normalised raw reward
    visits: int = 1  # §5: "Every node has visits (starts at 1)"
    values: list[float] = field(default_factory=list)
    children: list[Node] = field(default_factory=list, repr=False)
    priors_added: bool = False
    pending: int = 0  # simulations in flight through this node (virtual loss, §5.12); not copied to priors

    def mean(self) -> float | None:
        # np.mean, not sum / len: numpy's pairwise summation rounds differently, and with equal
        # values (constant or discrete rewards) that last bit decides §5's tie-breaks.
        return float(np.mean(self.values)) if self.values else None

    def row(self) -> TreeNode:
        return TreeNode(f"n{self.created}", self.parent and f"n{self.parent.created}", self.kind,
                        self.agent, self.depth, self.visits, self.mean(), len(self.values),
                        self.generation.sample_id if self.generation else None, self.created)


def sigmoid(x: float) -> float:
    """1 / (1 + e^-x) computed as the reference does (numpy, same rounding); e^-x overflowing
    to inf gives 0.0, as there, without the warning."""
    with np.errstate(over="ignore"):
        return float(1 / (1 + np.exp(-x)))


class Normalizer:
    """Raw reward -> node value v, per prompt (one instance per tree)."""

    def __init__(self, how: str, tau: float):
        self.how, self.tau, self.seen = how, tau, []

    def __call__(self, raw: float) -> float:
        if self.how == "sigmoid":
            return sigmoid(raw / self.tau)  # §5: v = sigmoid(raw_reward / tau)
        self.seen.append(raw)
        mean = sum(self.seen) / len(self.seen)
        std = math.sqrt(sum((r - mean) ** 2 for r in self.seen) / len(self.seen))
        return sigmoid((raw - mean) / std) if std > 0 else 0.5


class Tree:
    """The search tree of one prompt and the §5 rules that read it."""

    def __init__(self, agents: tuple[str, ...], opts: TOAOptions, width: int):
        self.agents, self.opts, self.width = agents, opts, width
        self.nodes: list[Node] = []
        self.responses_at: dict[int, int] = {}  # depth -> response nodes (incremental width)
        self.root = self._new(ROOT, 0, None)
        self._add_agents(self.root, refine=None)

    # -- construction -------------------------------------------------------------------
    def _new(self, kind: str, depth: int, parent: Node | None, **kw) -> Node:
        node = Node(len(self.nodes), kind, depth, parent, **kw)
        self.nodes.append(node)
        if parent is not None:
            parent.children.append(node)
        return node

    def _add_agents(self, parent: Node, refine: Generation | None) -> None:
        """§5: creating the root or a response node creates M agent children, in agent order;
        under a response node they refine it."""
        for agent in self.agents:
            self._new(AGENT, parent.depth + 1, parent, agent=agent, refine=refine)

    def add_priors(self, response: Node) -> None:
        """§5 prior copies: M from-scratch agent children copying the visits and value list of
        the root's agent child for the same agent (warm start)."""
        for twin in self.root.children:
            copy = self._new(AGENT, response.depth + 1, response, agent=twin.agent)
            copy.visits, copy.values = twin.visits, list(twin.values)
        response.priors_added = True

    def attach(self, agent_node: Node, gen: Generation, v: float) -> Node:
        """§5 step 5: the new response node, with its M refine children (none at max_depth)."""
        node = self._new(RESPONSE, agent_node.depth + 1, agent_node, agent=agent_node.agent,
                         generation=gen, reward=v)
        self.responses_at[node.depth] = self.responses_at.get(node.depth, 0) + 1
        if not self.is_leaf_depth(node.depth):
            self._add_agents(node, refine=gen)
        return node

    @staticmethod
    def backup(agent_node: Node, v: float) -> None:
        """§5 step 6: the agent node and every ancestor up to the root get visits += 1 and v
        appended; the new response node itself is not updated."""
        node: Node | None = agent_node
        while node is not None:
            node.visits += 1
            node.values.append(v)
            node = node.parent

    @staticmethod
    def hold(agent_node: Node, delta: int) -> None:
        """§5.12: a simulation starts (+1) or ends (-1) on the path from `agent_node` to the root.
        The path is fixed: nodes are never moved, so the one held is the one released."""
        node: Node | None = agent_node
        while node is not None:
            node.pending += delta
            node = node.parent

    # -- rules --------------------------------------------------------------------------
    def is_leaf_depth(self, depth: int) -> bool:
        return self.opts.max_depth is not None and depth + 2 > self.opts.max_depth

    def responses_at_depth(self, depth: int) -> int:
        if self.opts.incremental_width:
            return self.responses_at.get(depth, 0)
        # The reference's walk: children of every node one level up (agent nodes only have
        # response children), found by a walk from the root.
        level = [self.root]
        for _ in range(depth - 1):
            level = [c for n in level for c in n.children]
        return sum(len(n.children) for n in level)

    def fully_expanded(self, node: Node) -> bool:
        """§5 "Fully expanded", plus the documented guards and options."""
        if node.kind != AGENT:
            return True  # §5: root and response nodes always
        if not node.children or self.is_leaf_depth(node.depth + 1):
            return False  # nothing to descend into / max_depth: keep sampling here
        width_reached = self.responses_at_depth(node.depth + 1) >= self.width  # §5 (a)
        better = node.parent.kind == ROOT or max(c.reward for c in node.children) > node.parent.reward  # §5 (b), strict >
        if width_reached and better:
            return True
        cap = self.opts.refine_cap  # option: stop absorbing under a never-improving node
        return cap is not None and not better and len(node.children) >= cap

    def best_child(self, node: Node, plays: int) -> Node:
        """§5 "Best child"."""
        children = node.children
        if children[0].kind == RESPONSE:
            # keep the top_k response children by value; equal values: the LATER child wins
            # (§5 "reference tie-break: the LAST of equal maxima"; see the module docstring)
            ranked = sorted(range(len(children)), key=lambda i: (children[i].reward, i))
            children = [children[i] for i in sorted(ranked[-self.opts.top_k:])]
        # §5 quirk: global P, 1-based (pending plays count: each was selected); parent visits
        # count their virtual ones (§5.12)
        n_ucb = node.visits + self.opts.virtual_loss * node.pending if node.pending else node.visits
        n_ucb = n_ucb if self.opts.ucb_parent_visits else plays
        best, best_score = children[0], None
        for child in children:
            score = self.ucb(child, n_ucb)
            if best_score is None or score > best_score:  # first candidate with the strictly highest score
                best, best_score = child, score
        return best

    def ucb(self, child: Node, n: int) -> float:
        virtual = self.opts.virtual_loss * child.pending
        if virtual:  # §5.12: pending visits worth 0 (never with parallel = 1: nothing is pending then)
            mean = float(np.sum(child.values)) / (len(child.values) + virtual)
            return float(mean + self.opts.alpha * np.sqrt(2 * np.log(n) / (child.visits + virtual)))
        if child.visits == 1 and not child.values:
            return math.inf  # §5: +inf for an unvisited node
        # numpy as in the reference, so that scores and their ties are bit-identical
        return float(np.mean(child.values) + self.opts.alpha * np.sqrt(2 * np.log(n) / child.visits))

    def select(self, plays: int) -> Node:
        """§5 play step 1: descend from the root to the first node not fully expanded."""
        node = self.root
        while True:
            if node.kind == RESPONSE and not node.priors_added:
                self.add_priors(node)  # §5: first pass through a response node (visits == 1)
            if not self.fully_expanded(node):
                return node
            node = self.best_child(node, plays)


@register
class TOA(Method):
    """Tree search over agents; see the module docstring for the rules and options."""

    name = "toa"
    Options = TOAOptions

    @property
    def mode(self) -> str:
        return self.options.mode

    def resolve(self, m: int, n: int) -> tuple[TOAOptions, int]:
        """Options and width W for M agents and n samples each (width rules in the docstring)."""
        w = self.options.width if self.options.width is not None else (m * n) // 3
        if self.mode == "improved" and self.options.width is None:
            w = max(m, w)
        if w < m:
            fixes = [f"set method_options.toa.width >= {m}"]
            if self.options.width is None:
                fixes += ["or n >= 3", "or method_options.toa.mode = 'improved'"]
            raise ValueError(
                f"toa: width W={w} is smaller than the number of agents M={m} (n={n}; W = floor(M * n / 3) "
                f"unless set); the reference crashes here, since an agent under the root would count as "
                f"fully expanded with no response to descend into. Fix: {', '.join(fixes)}.")
        opts = self.options
        if opts.ucb_parent_visits is None:
            opts = opts.model_copy(update={"ucb_parent_visits": self.mode == "improved"})
        if self.mode == "improved" and opts.refine_cap is None:
            opts = opts.model_copy(update={"refine_cap": max(1, math.ceil(w / m))})
        return opts, w

    def check_budget(self, m: int, n: int) -> None:
        """Fail at config time, before any server starts, when the width cannot work."""
        self.resolve(m, n)

    async def run(self, ctx: MethodContext) -> MethodOutput:
        opts, width = self.resolve(len(ctx.agents), ctx.n)
        tree, normalize = Tree(ctx.agents, opts, width), Normalizer(opts.normalize, opts.tau)
        samples: list[Sample] = []
        window: deque[tuple[Node, int, asyncio.Task]] = deque()  # plays in flight, oldest first
        try:
            for play in range(ctx.budget):  # §5: exactly n * M plays
                if len(window) == opts.parallel:  # the OLDEST, not the first done: same tree every run
                    samples.append(await self._finish(tree, normalize, *window.popleft()))
                node = tree.select(plays=play + 1)
                tree.hold(node, +1)
                # a task's first step asks for its slot, and tasks start in creation order (§5.12)
                window.append((node, play, asyncio.create_task(self._play(ctx, node))))
            while window:
                samples.append(await self._finish(tree, normalize, *window.popleft()))
        finally:  # a play that raised ends the prompt: leave no orphan task behind
            for *_, task in window:
                task.cancel()
        return MethodOutput(samples, [n.row() for n in tree.nodes])

    @staticmethod
    async def _play(ctx: MethodContext, node: Node) -> tuple[Generation, Score]:
        """§5.6 steps 2-4 for the selected agent node: prompt, one generation, its reward."""
        text = ctx.prompt.text if node.refine is None else \
            load("refine").render(question=ctx.prompt.text, answer=node.refine.text or "")  # step 2
        gen = (await ctx.generate(node.agent, user(text), 1))[0]  # step 3: expansion
        return gen, (await score_all(ctx, [gen]))[0]  # step 4: reward vs the ORIGINAL prompt

    async def _finish(self, tree: Tree, normalize: Normalizer, node: Node, play: int, task: asyncio.Task) -> Sample:
        """The play's Sample once its task is done, after §5.6 steps 5-6 (called in play order)."""
        gen, score = await task
        tree.hold(node, -1)  # §5.12: the virtual loss goes before the real value comes
        if gen.ok and score.ok:  # a failed play leaves the tree unchanged (docstring)
            v = normalize(score.value)
            tree.attach(node, gen, v)  # step 5
            tree.backup(node, v)  # step 6
        return self._sample(node, gen, score, play)

    @staticmethod
    def _sample(node: Node, gen: Generation, score: Score, play: int) -> Sample:
        parent = node.refine.sample_id if node.refine is not None else None
        return Sample(gen, score, f"{node.agent}_layer_{node.depth}", parent, node.depth + 1, play)
