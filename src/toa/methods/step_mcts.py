"""Step-level MCTS with a verifier (docs/methods.md §9; after mcts-llm-sampler, moved from tokens
to reasoning steps as its author recommends).

For verifiable prompts (GSM8K/MATH-style, a gold answer in `prompt.reference`). One tree per
prompt; a node is a partial solution: the steps so far (its `state`, the assistant text), a
step being one line. A simulation:

1. select: from the root, descend by PUCT while the node has children:
   Q(c) + c_puct * P(c) * sqrt(max(1, N(parent))) / (1 + N(c)), Q(c) = mean outcome of c
   (`fpu` while unvisited); ties go to the higher prior, then the earlier child.
2. expand: a leaf that is the root, or was visited before (and is below `max_depth` and not
   terminal), gets its children: `k` continuations of its state sampled in one request
   (n=k, stop at a newline, `step_max_tokens`), deduplicated, blank lines dropped (unless
   nothing else came); the simulation moves on to the PUCT-best new child. Priors: softmax(mean token logprob / `prior_temperature`) over the
   distinct steps, mixed with uniform: P = (1 - prior_mix) * softmax + prior_mix / k'
   (uniform when the server gave no logprobs).
3. evaluate: a terminal node (its step ended the answer: the model stopped without a newline)
   is worth its verified outcome, with no generation; any other node is rolled out: one
   continuation of its state to the end (no stop, `rollout_max_tokens`) whose whole solution
   (state + rollout) the math verifier checks: 1.0 right, 0.0 wrong.
4. backup: every node on the path gets visits += 1 and the outcome added.

Continuing a partial answer uses vLLM's chat extras: the messages are [user prompt, assistant
state] with continue_final_message=True, add_generation_prompt=False; steps keep their newline
(include_stop_str_in_output=True), which is how a step that ended the answer (EOS, no newline)
is told from one that ended a line. So step_mcts needs vLLM (or a server with these extras).
Checked on vLLM 0.32 (CPU): SmolLM2's chat template keeps the state's final newline; Gemma 3's
trims the assistant message, so Gemma often answers a state with a bare newline first (hence
blank lines are not steps).

Budget (comparable with the other methods): `simulations`, default n * M, so the number of
complete solutions (rollouts and terminal steps reached) is at most what the other methods
produce as responses; expansions are extra, short generations (k per expansion), which the
summary's generation and token counts show. A simulation that selects an already verified
terminal node costs nothing and adds nothing new.

Many trees in flight: the engine runs the trees of a batch's prompts concurrently
(`prompt_concurrency`); inside one tree `parallel` simulations run per wave with a virtual loss
(`virtual_loss` pending visits worth 0 on every node of a pending path) so that they take
different paths. A wave selects all its paths first, then makes its expansions, then its
rollouts, each phase's requests issued in path order and applied in path order, so the tree
(and every cache key) is the same on every run: a rerun replays every call.

Agents: `agent` names the one agent that proposes steps and rolls out; unset, simulation i uses
agents[i % M] for both (mixed-model trees, one model's steps continued by another).

Rows:
- Sample per generation. action "step": a proposed line (text = the line; Score "skipped":
  a line is not a response to the prompt); "answer": a step that ended the solution, and
  "rollout": a continuation to the end; for these two the text is the WHOLE solution (state +
  generation, what SFT/DPO want) and the Score is the run's configured reward on it (so
  method_summary compares step_mcts with the others on the same reward; with reward.kind =
  "math" it equals the verifier outcome). parent_id = sample id of the step continued (None at
  the root), depth = steps in the state the generation continues + (1 for a step).
  The tree's values always come from the verifier, whatever the configured reward.
- TreeNode per node: kind "root", "step" or "answer" (terminal), the proposing agent, visits,
  value = mean outcome, sample_id = the (first) sample of that step.
- `value_targets` per visited node: the prompt, the state, visits and mean outcome: training
  data for a value model (view `value_targets`, Parquet per batch, `toa export`).

Failures are data: a failed generation is a Sample with its error and changes nothing in the
tree (the simulation is spent); a prompt without a usable reference raises a ValueError that
the engine records as the prompt's method error.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field, replace

from pydantic import Field

from toa.methods.base import Method, MethodContext, Options, register, score_all
from toa.reward.math_verify import score_one
from toa.rows import (
    ERROR,
    SKIPPED,
    Generation,
    MethodOutput,
    Sample,
    Score,
    TreeNode,
    ValueTarget,
)

ROOT, STEP, ANSWER, ROLLOUT = "root", "step", "answer", "rollout"
CONTINUE = {"continue_final_message": True, "add_generation_prompt": False}  # vLLM chat extras
STEP_SKIPPED = Score(None, SKIPPED, "a reasoning step, not a response to the prompt")


class StepMCTSOptions(Options):
    k: int = Field(4, ge=1, description="Continuations sampled per expansion (before deduplication).")
    c_puct: float = Field(1.0, ge=0, description="Exploration weight in PUCT.")
    prior_temperature: float = Field(1.0, gt=0, description="Temperature of the softmax over continuation log-probabilities that gives the priors.")
    prior_mix: float = Field(0.0, ge=0, le=1, description="Weight of the uniform distribution mixed into the priors.")
    fpu: float = Field(0.0, description="Q of an unvisited child (first-play urgency).")
    simulations: int | None = Field(None, ge=1, description="Simulations per prompt; None: n * M.")
    parallel: int = Field(1, ge=1, description="Simulations per wave in one tree.")
    virtual_loss: int = Field(3, ge=0, description="Pending visits (each worth 0) a wave's path adds to its nodes.")
    max_depth: int = Field(8, ge=1, description="Most steps in a state; a node there is rolled out, never expanded.")
    step_max_tokens: int = Field(64, ge=1, description="Token cap of one reasoning step.")
    rollout_max_tokens: int = Field(256, ge=1, description="Token cap of a rollout to the answer.")
    agent: str | None = Field(None, description="The one agent to use; None: simulation i uses agents[i % M].")


@dataclass(eq=False)
class StepNode:
    created: int
    depth: int  # steps in the state
    parent: StepNode | None = field(default=None, repr=False)
    state: str = ""  # the steps so far: the assistant text this node continues from
    prior: float = 1.0
    agent: str | None = None
    sample_id: str | None = None
    outcome: float | None = None  # terminal node: the verified outcome of its solution
    visits: int = 0
    total: float = 0.0  # sum of backed-up outcomes
    virtual: int = 0  # pending visits of the current wave (each worth 0)
    children: list[StepNode] = field(default_factory=list, repr=False)

    @property
    def terminal(self) -> bool:
        return self.outcome is not None

    def mean(self) -> float | None:
        return self.total / self.visits if self.visits else None

    def row(self) -> TreeNode:
        kind = ROOT if self.parent is None else ANSWER if self.terminal else STEP
        return TreeNode(f"n{self.created}", self.parent and f"n{self.parent.created}", kind, self.agent,
                        self.depth, self.visits, self.mean(), self.visits, self.sample_id, self.created)


def priors(gens: list[Generation], temperature: float, mix: float) -> list[float]:
    """Softmax of the steps' mean token logprobs (length-normalised, so long and short lines
    compete fairly), mixed with uniform; uniform when any step has no logprob."""
    if not gens:
        return []
    logps = [g.mean_logprob for g in gens]
    if any(lp is None for lp in logps):
        return [1 / len(gens)] * len(gens)
    top = max(logps)
    weights = [math.exp((lp - top) / temperature) for lp in logps]
    total = sum(weights)
    return [(1 - mix) * w / total + mix / len(gens) for w in weights]


def is_terminal(gen: Generation) -> bool:
    """The model ended the answer (EOS) rather than a line: stopped, and no newline kept."""
    return gen.finish_reason == "stop" and not (gen.text or "").endswith("\n")


class StepTree:
    """The tree of one prompt and the PUCT rules that read it."""

    def __init__(self, opts: StepMCTSOptions):
        self.options = opts
        self.nodes: list[StepNode] = []
        self.root = self.new(0, None)

    def new(self, depth: int, parent: StepNode | None, **kw) -> StepNode:
        node = StepNode(len(self.nodes), depth, parent, **kw)
        self.nodes.append(node)
        if parent is not None:
            parent.children.append(node)
        return node

    def puct(self, child: StepNode, parent: StepNode) -> float:
        n = child.visits + child.virtual
        q = child.total / n if n else self.options.fpu  # a virtual visit counts as an outcome of 0
        n_parent = parent.visits + parent.virtual
        return q + self.options.c_puct * child.prior * math.sqrt(max(1, n_parent)) / (1 + n)

    def best_child(self, node: StepNode) -> StepNode:
        return max(node.children, key=lambda c: (self.puct(c, node), c.prior, -c.created))

    def select(self) -> list[StepNode]:
        path = [self.root]
        while path[-1].children:
            path.append(self.best_child(path[-1]))
        return path

    def needs_expansion(self, node: StepNode) -> bool:
        return (not node.terminal and node.depth < self.options.max_depth
                and (node.parent is None or node.visits > 0))

    def mark(self, path: list[StepNode], sign: int) -> None:
        """Add (+1) or remove (-1) a pending simulation's virtual loss along its path."""
        for node in path:
            node.virtual += sign * self.options.virtual_loss

    @staticmethod
    def backup(path: list[StepNode], outcome: float) -> None:
        for node in path:
            node.visits += 1
            node.total += outcome


@register
class StepMCTS(Method):
    """Step-level MCTS valued by verified rollouts; see the module docstring."""

    name = "step_mcts"
    Options = StepMCTSOptions

    def generations(self, m: int, n: int) -> None:
        return None  # expansions and rollouts depend on where the search goes

    async def run(self, ctx: MethodContext) -> MethodOutput:
        check_reference(ctx)
        if self.options.agent is not None and self.options.agent not in ctx.agents:
            raise ValueError(f"step_mcts: agent {self.options.agent!r} is not configured; agents: {list(ctx.agents)}")
        search = _Search(ctx, self.options)
        sims = self.options.simulations or ctx.budget
        for start in range(0, sims, self.options.parallel):
            await search.wave(range(start, min(sims, start + self.options.parallel)))
        return MethodOutput(search.samples, [n.row() for n in search.tree.nodes],
                            {"value_targets": search.value_targets()})


def check_reference(ctx: MethodContext) -> None:
    """Fail early (a method error row) on a prompt the verifier cannot check."""
    probe = score_one(ctx.prompt, "0")
    if not probe.ok:
        raise ValueError(f"step_mcts needs a verifiable prompt (a gold answer in `reference`): {probe.error}")


class _Search:
    """One prompt's search: the tree, the samples in generation order, the wave mechanics."""

    def __init__(self, ctx: MethodContext, opts: StepMCTSOptions):
        self.ctx, self.options = ctx, opts
        self.tree = StepTree(opts)
        self.samples: list[Sample] = []

    def agent_for(self, sim: int) -> str:
        return self.options.agent or self.ctx.agents[sim % len(self.ctx.agents)]

    def messages(self, state: str) -> tuple[list[dict], dict]:
        """The request continuing `state`: the bare prompt at the root, else the partial
        assistant message continued in place."""
        user = [{"role": "user", "content": self.ctx.prompt.text}]
        if not state:
            return user, {}
        return user + [{"role": "assistant", "content": state}], dict(CONTINUE)

    async def wave(self, sims: range) -> None:
        paths = []
        for _ in sims:  # 1. select every path first; the virtual loss spreads them
            path = self.tree.select()
            self.tree.mark(path, +1)
            paths.append(path)
        leaves = {id(p[-1]): (p[-1], s) for p, s in zip(paths, sims) if self.tree.needs_expansion(p[-1])}
        expansions = await asyncio.gather(*(self.expand_request(leaf, self.agent_for(s)) for leaf, s in leaves.values()))
        for (leaf, _), gens in zip(leaves.values(), expansions):  # 2. expand, in path order
            await self.add_children(leaf, gens)
        evaluate = []
        for path, sim in zip(paths, sims):
            if id(path[-1]) in leaves:
                if not path[-1].children:
                    evaluate.append(None)  # the expansion failed: this simulation is spent
                    continue
                child = self.tree.best_child(path[-1])
                self.tree.mark([child], +1)
                path.append(child)
            evaluate.append(path[-1])
        # 3. evaluate: the rollouts of the wave at once (issued in path order)
        results = await asyncio.gather(*(self.rollout(node, self.agent_for(s)) for node, s in zip(evaluate, sims)))
        for path, (sample, outcome) in zip(paths, results):  # 4. record and back up, in path order
            if sample is not None:
                self.samples.append(replace(sample, order=len(self.samples)))
            self.tree.mark(path, -1)
            if outcome is not None:
                self.tree.backup(path, outcome)

    async def expand_request(self, leaf: StepNode, agent: str) -> list[Generation]:
        messages, extra = self.messages(leaf.state)
        return await self.ctx.generate(agent, messages, self.options.k, stop=["\n"], include_stop_str_in_output=True,
                                       max_tokens=self.options.step_max_tokens, logprobs=True, **extra)  # priors

    async def add_children(self, leaf: StepNode, gens: list[Generation]) -> None:
        """One child per distinct non-blank step (a repeated or blank step adds a sample, not
        a node); steps that end the answer are verified here and their solutions scored."""
        distinct: dict[tuple[str, bool], Generation] = {}
        for g in gens:
            if g.ok:
                distinct.setdefault(((g.text or "").strip(), is_terminal(g)), g)
        # A blank line is no step. Chat templates that trim the assistant message (Gemma's)
        # drop the state's final newline, so the model often starts with one; keep a blank
        # child only when nothing else came, so that the tree still moves on.
        kept = [g for key, g in distinct.items() if key[0] or key[1]] or list(distinct.values())[:1]
        for g, p in zip(kept, priors(kept, self.options.prior_temperature, self.options.prior_mix)):
            state = leaf.state + (g.text or "")
            outcome = self.verify(state) if is_terminal(g) else None
            self.tree.new(leaf.depth + 1, leaf, state=state, prior=p, agent=g.agent, sample_id=g.sample_id, outcome=outcome)
        for g in gens:  # every generation is a sample, duplicates and failures included
            if g.ok and is_terminal(g):  # a whole solution: scored like any method's response
                whole = replace(g, text=leaf.state + (g.text or ""))
                self.add_sample(whole, (await score_all(self.ctx, [whole]))[0], ANSWER, leaf, leaf.depth + 1)
            else:
                self.add_sample(g, STEP_SKIPPED if g.ok else Score(None, ERROR, "generation failed"),
                                STEP, leaf, leaf.depth + 1)

    async def rollout(self, node: StepNode | None, agent: str) -> tuple[Sample | None, float | None]:
        """The node's outcome: its own if terminal (no generation), else that of one verified
        rollout, with the rollout's Sample (its order is set by the caller, in path order)."""
        if node is None:
            return None, None  # the simulation's expansion failed
        if node.terminal:
            return None, node.outcome
        messages, extra = self.messages(node.state)  # no await before generate: slots in call order
        gen = (await self.ctx.generate(agent, messages, 1, max_tokens=self.options.rollout_max_tokens, **extra))[0]
        if not gen.ok:
            return Sample(gen, Score(None, ERROR, "generation failed"), ROLLOUT, node.sample_id, node.depth), None
        whole = replace(gen, text=node.state + (gen.text or ""))
        score = (await score_all(self.ctx, [whole]))[0]
        return Sample(whole, score, ROLLOUT, node.sample_id, node.depth), self.verify(whole.text)

    def verify(self, solution: str) -> float | None:
        return score_one(self.ctx.prompt, solution).value

    def add_sample(self, gen: Generation, score: Score, action: str, parent: StepNode, depth: int) -> None:
        self.samples.append(Sample(gen, score, action, parent.sample_id, depth, len(self.samples)))

    def value_targets(self) -> list[ValueTarget]:
        """Value-model training rows: every visited node's state and its mean outcome."""
        return [ValueTarget(node_id=f"n{n.created}", parent_id=n.parent and f"n{n.parent.created}", depth=n.depth,
                            prompt=self.ctx.prompt.text, state=n.state, visits=n.visits, value=n.mean(),
                            prior=n.prior, terminal=n.terminal)
                for n in self.tree.nodes if n.visits]
