"""AB-MCTS: adaptive-branching Monte Carlo tree search (docs/methods.md §14; Inoue et al., "Wider
or Deeper? Scaling LLM Inference-Time Compute with Adaptive Branching Tree Search", arXiv
2503.04412, with its Multi-LLM extension). The variant is AB-MCTS-A (node aggregation) with
conjugate posteriors, as the reference implementation (SakanaAI/treequest, `ABMCTSA` with its
default model selection, "multiarm_bandit_thompson") does it; AB-MCTS-M (a mixed model fitted by
MCMC) is not implemented.

One tree per prompt. The root is Q; every other node holds one generation and its value v (the
normalised raw reward, docs/methods.md §5.7). A play makes exactly one generation:

1. select: at node N (starting at the root), if N has children, Thompson sampling between N's
   GEN arm (make a new child of N: "wider") and its CONT arm (go into an existing child:
   "deeper"), in that draw order; CONT then picks a child by Thompson sampling over the
   children's posteriors (draw order = creation order) and the walk goes on from it. A node
   without children, and a GEN choice, stop the walk at N.
2. agent: the agent for the new child is chosen by Thompson sampling over one posterior per
   agent (configured order) built from every v that agent has produced anywhere in this tree
   (the Multi-LLM extension); one agent, or `multi_llm = false`, makes no draw.
3. generate: at the root, Q as one user message; under a response node, the `refine` template
   with Q and that node's answer (as toa.py does). One generation, scored against Q (§0.4).
4. backup: the new child's own posterior gets v; N's GEN arm gets v; N and every ancestor of N
   get v in their own posteriors (the one their parent's CONT step draws from), and every strict
   ancestor of N gets v in its CONT arm; the agent's posterior gets v.

So a GEN arm holds the values of the children made directly at its node, a CONT arm the values
made two or more levels below it, and a node's own posterior its own v and every v below it.

Posteriors (one per arm, all with the same prior; docs/methods.md §14.2):
- "gaussian" (default): normal with unknown mean and variance, normal-inverse-chi-squared prior
  (m, kappa, nu, tau^2) = (0, 1, 1, 0.1) as the reference; a draw is sigma^2 ~
  Scaled-Inv-chi^2(nu_n, tau_n^2), then mu ~ N(m_n, sigma^2 / kappa_n), and mu is the arm's score.
- "beta": Beta(a + sum v, b + n - sum v), Jeffreys prior a = b = 0.5; needs v in [0, 1].

Determinism and replay (docs/methods.md §0.5, §0.7): every draw comes from the method's own
`random.Random(f"{seed}:{prompt_id}:ab_mcts")`, in a fixed order, and the only other input of a
choice is the rewards returned. A rerun that replays the record therefore takes the same path and
asks the same (agent, messages) in the same order, i.e. the same slots.

Decisions where the paper and the reference are silent:
- Failed generation or failed reward: the play is spent, the Sample is kept with its error (the
  reward stays None), and the tree and every posterior are left unchanged (a draw already made
  is not undone). Asking the same (agent, messages) again gets the next slot: a retry.
- `batch > 1`: as the reference's `ask_batch`, `batch` plays are selected from the same tree (no
  virtual loss: Thompson's draws spread them), generated concurrently, and told in play order.
- Rows: action `<agent>_answer` (depth 1, no parent) or `<agent>_refine` (parent = the refined
  node's sample id, depth = parent's depth + 1); order = play index. TreeNodes: kind "root" and
  "response" (one per scored generation); visits = n_values = observations in the node's own
  posterior (the root: every v), value = their mean. GEN/CONT arms are not rows.
"""

from __future__ import annotations

import asyncio
import math
import random
from dataclasses import dataclass, field
from typing import Literal

from pydantic import Field, field_validator

from toa.methods.base import Method, MethodContext, Options, register, score_all, user
from toa.methods.toa import Normalizer
from toa.rows import Generation, MethodOutput, Sample, Score, TreeNode
from toa.templates import load

ROOT, RESPONSE = "root", "response"


class ABMCTSOptions(Options):
    variant: str = Field("a", description="'a': AB-MCTS-A (node aggregation, conjugate posteriors). 'm' (AB-MCTS-M, a mixed model fitted by MCMC) is not implemented.")
    multi_llm: bool = Field(True, description="Choose the agent of every new node by Thompson sampling over per-agent posteriors (Multi-LLM AB-MCTS); false: the first agent only, with N = n * M plays.")
    dist: Literal["gaussian", "beta"] = Field("gaussian", description="Posterior of every arm: normal with unknown mean and variance (normal-inverse-chi-squared prior), or Beta (values must lie in [0, 1]).")
    prior_m: float = Field(0.0, description="gaussian: prior mean m.")
    prior_kappa: float = Field(1.0, gt=0, description="gaussian: prior pseudo-count of the mean (kappa).")
    prior_nu: float = Field(1.0, gt=0, description="gaussian: prior degrees of freedom of the variance (nu).")
    prior_tau_square: float = Field(0.1, gt=0, description="gaussian: prior scale of the variance (tau^2).")
    prior_a: float = Field(0.5, gt=0, description="beta: prior a (0.5 with prior_b 0.5: Jeffreys).")
    prior_b: float = Field(0.5, gt=0, description="beta: prior b.")
    normalize: Literal["sigmoid", "standardize", "none"] = Field("sigmoid", description="Raw reward -> value v, as TOA (docs/methods.md §5.7): sigmoid(raw / tau), sigmoid of the z-score over this prompt's rewards so far, or the raw reward itself (e.g. a 0/1 verifier).")
    tau: float = Field(0.1, gt=0, description="Temperature of the sigmoid (normalize = 'sigmoid').")
    batch: int = Field(1, ge=1, description="Plays selected from the same tree before their results are told, generated concurrently (the reference's ask_batch); 1: the sequential search.")

    @field_validator("variant")
    @classmethod
    def _only_a(cls, v: str) -> str:
        if v == "m":
            raise ValueError("'m' (AB-MCTS-M) is not implemented: its mixed model needs MCMC (PyMC in the "
                             "reference); use 'a' (docs/methods.md §14)")
        if v != "a":
            raise ValueError(f"{v!r}: must be 'a'")
        return v


@dataclass(frozen=True)
class Prior:
    dist: str = "gaussian"
    m: float = 0.0
    kappa: float = 1.0
    nu: float = 1.0
    tau_square: float = 0.1
    a: float = 0.5
    b: float = 0.5


class Posterior:
    """Conjugate posterior of one arm's score (docs/methods.md §14.2). Keeps n, the mean and the
    sum of squared deviations (Welford), so an observation costs O(1)."""

    __slots__ = ("m2", "mean", "n", "prior")

    def __init__(self, prior: Prior):
        self.prior, self.n, self.mean, self.m2 = prior, 0, 0.0, 0.0

    def add(self, v: float) -> None:
        self.n += 1
        delta = v - self.mean
        self.mean += delta / self.n
        self.m2 += delta * (v - self.mean)

    def draw(self, rng: random.Random) -> float:
        p, n = self.prior, self.n
        if p.dist == "beta":
            total = self.mean * n
            return rng.betavariate(p.a + total, p.b + n - total)
        # normal-inverse-chi-squared update (Murphy, PML: Advanced Topics §3.4.3.3, as the reference)
        kappa, nu = p.kappa + n, p.nu + n
        m = (p.kappa * p.m + n * self.mean) / kappa
        tau_square = (p.nu * p.tau_square + self.m2 + n * p.kappa * (p.m - self.mean) ** 2 / kappa) / nu
        sigma_square = (nu * tau_square / 2) / rng.gammavariate(nu / 2, 1.0)  # Inv-Gamma(nu/2, nu tau^2/2)
        return rng.normalvariate(m, math.sqrt(sigma_square / kappa))


def thompson(arms: list[Posterior], rng: random.Random) -> int:
    """Index of the arm with the highest draw; draws in list order, the first of equal draws wins."""
    best, best_draw = 0, None
    for i, arm in enumerate(arms):
        draw = arm.draw(rng)
        if best_draw is None or draw > best_draw:
            best, best_draw = i, draw
    return best


@dataclass(eq=False)
class ABNode:
    """A tree node: the root (Q) or one scored generation. `gen` and `cont` are the arms of the
    choice made AT this node; `own` is what its parent's CONT step draws for it."""

    created: int
    depth: int
    prior: Prior = field(repr=False)
    parent: ABNode | None = field(default=None, repr=False)
    agent: str | None = None
    generation: Generation | None = None
    v: float | None = None
    children: list[ABNode] = field(default_factory=list, repr=False)
    gen: Posterior = field(init=False, repr=False)
    cont: Posterior = field(init=False, repr=False)
    own: Posterior = field(init=False, repr=False)

    def __post_init__(self):
        self.gen, self.cont, self.own = Posterior(self.prior), Posterior(self.prior), Posterior(self.prior)

    def row(self) -> TreeNode:
        n = self.own.n
        return TreeNode(f"n{self.created}", self.parent and f"n{self.parent.created}", RESPONSE if self.parent else ROOT,
                        self.agent, self.depth, n, self.own.mean if n else None, n,
                        self.generation.sample_id if self.generation else None, self.created)


class Search:
    """The AB-MCTS-A tree of one prompt: `ask` chooses where and with whom to generate, `tell`
    attaches a scored generation and backs its value up (module docstring, steps 1, 2 and 4).
    Plain Python, no I/O: the same object serves the method and the speed benchmark."""

    def __init__(self, agents: tuple[str, ...], prior: Prior, rng: random.Random):
        self.agents, self.prior, self.rng = agents, prior, rng
        self.root = ABNode(0, 0, prior)
        self.nodes = [self.root]
        self.by_agent = [Posterior(prior) for _ in agents]

    def ask(self) -> tuple[ABNode, str]:
        node = self.root
        while node.children:
            if thompson([node.gen, node.cont], self.rng) == 0:
                break  # GEN: a new child of this node (wider)
            node = node.children[thompson([c.own for c in node.children], self.rng)]  # CONT (deeper)
        return node, self.pick_agent()

    def pick_agent(self) -> str:
        if len(self.agents) == 1:
            return self.agents[0]  # nothing to choose: no draw (as the reference)
        return self.agents[thompson(self.by_agent, self.rng)]

    def tell(self, node: ABNode, agent: str, generation: Generation, v: float) -> ABNode:
        child = ABNode(len(self.nodes), node.depth + 1, self.prior, node, agent, generation, v)
        self.nodes.append(child)
        node.children.append(child)
        child.own.add(v)
        self.by_agent[self.agents.index(agent)].add(v)
        node.gen.add(v)
        up: ABNode | None = node
        while up is not None:  # the root's own posterior is never drawn; it keeps the row's mean
            up.own.add(v)
            if up.parent is not None:
                up.parent.cont.add(v)
            up = up.parent
        return child


@register
class ABMCTS(Method):
    """Adaptive-branching MCTS; see the module docstring for the rules and options."""

    name = "ab_mcts"
    Options = ABMCTSOptions

    def prior(self) -> Prior:
        o = self.options
        return Prior(o.dist, o.prior_m, o.prior_kappa, o.prior_nu, o.prior_tau_square, o.prior_a, o.prior_b)

    def check_budget(self, m: int, n: int) -> None:
        """A batch as large as the budget selects every play from the empty tree: no play would
        see another's result, and it is parallel sampling, not a search."""
        budget = m * n
        if self.options.batch > 1 and self.options.batch >= budget:
            raise ValueError(f"ab_mcts: batch {self.options.batch} is not below the budget n * M = {budget}: no play "
                             f"would see another's result; set method_options.ab_mcts.batch < {budget}")

    async def run(self, ctx: MethodContext) -> MethodOutput:
        opts = self.options
        self.check_budget(len(ctx.agents), ctx.n)
        agents = ctx.agents if opts.multi_llm else ctx.agents[:1]
        search = Search(agents, self.prior(), random.Random(f"{ctx.seed}:{ctx.prompt.prompt_id}:ab_mcts"))
        to_value = (lambda raw: raw) if opts.normalize == "none" else Normalizer(opts.normalize, opts.tau)
        samples: list[Sample] = []
        while len(samples) < ctx.budget:  # exactly n * M plays (docs/methods.md §0.2)
            picks = [search.ask() for _ in range(min(opts.batch, ctx.budget - len(samples)))]
            # tasks start in play order, so their slots do too (§0.5); results are told in play order
            tasks = [asyncio.create_task(self._play(ctx, node, agent)) for node, agent in picks]
            try:
                results = [await task for task in tasks]
            finally:  # a play that raised ends the prompt: leave no orphan task behind
                for task in tasks:
                    task.cancel()
            for (node, agent), (gen, score) in zip(picks, results):
                if gen.ok and score.ok:  # a failed play leaves the tree unchanged (docstring)
                    v = to_value(score.value)
                    if opts.dist == "beta" and not 0.0 <= v <= 1.0:
                        raise ValueError(f"ab_mcts: value {v} outside [0, 1] with dist = 'beta' and normalize = "
                                         f"'none'; use normalize = 'sigmoid' or 'standardize'")
                    search.tell(node, agent, gen, v)
                samples.append(self._sample(node, agent, gen, score, len(samples)))
        return MethodOutput(samples, [n.row() for n in search.nodes])

    @staticmethod
    async def _play(ctx: MethodContext, node: ABNode, agent: str) -> tuple[Generation, Score]:
        """Step 3: the prompt (Q, or refine Q + the node's answer), one generation, its reward vs Q."""
        text = ctx.prompt.text if node.generation is None else \
            load("refine").render(question=ctx.prompt.text, answer=node.generation.text or "")
        gen = (await ctx.generate(agent, user(text), 1))[0]
        return gen, (await score_all(ctx, [gen]))[0]

    @staticmethod
    def _sample(node: ABNode, agent: str, gen: Generation, score: Score, order: int) -> Sample:
        if node.generation is None:
            return Sample(gen, score, f"{agent}_answer", None, 1, order)
        return Sample(gen, score, f"{agent}_refine", node.generation.sample_id, node.depth + 1, order)
