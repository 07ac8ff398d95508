"""Self-MoA: several samples of ONE model, aggregated by that same model (docs/methods.md §13;
Self-MoA and Self-MoA-Seq from arXiv 2502.00674, built on the MoA of §4 / arXiv 2412.17061).

One agent (the first configured, or `agent`) makes every generation: exactly N = n * M per
prompt (docs/methods.md §0.2). The budget is split into rounds; a round is one Self-MoA:

- proposals: P samples of Q, each asked as one user message (depth 0);
- aggregation steps 1..S (depth j for step j), each one generation with MoA's aggregate
  request (`toa.methods.moa.aggregate_messages`: the `aggregate` template plus numbered
  responses as the SYSTEM message, Q as the user message):
  - `window = None` (Self-MoA): S = 1, the step sees all P proposals;
  - `window = w` (Self-MoA-Seq): the step sees the current synthesized output (the round's last
    successful step, shown first) plus the next unseen proposals, w responses at most; step 1
    has no synthesized output yet. The steps walk the proposals until every one was seen.

Sizes (`plan`): a round with proposals = K and window w costs c = K + S(K, w); the budget is
split into g = ceil(N / c) rounds as equal as possible (earlier rounds one generation larger),
so a round never holds more than K proposals and no round is a lone sample. A round of r
generations has S = ceil((r - 1) / w) steps (1 without a window) and P = r - S proposals. Step 1
sees up to w proposals, each later step up to w - 1 new ones, the last step what is left; when
that would leave the last step nothing new, step 1 hands it one (`windows`).

Every generation is a Sample, scored against the original Q in one reward call at the end.
Label `<agent>_<depth>`; parent_id = the first response shown to the aggregator (the
synthesized output when there is one, else the first successful proposal of its window), None
for a proposal or a step that answered Q alone; order = generation order (all proposals,
round-major, in one request; then step 1 of every round in round order, step 2, ...).

Failures (errors are rows, docs/methods.md §0.6): a failed proposal keeps its place in its
window but is left out of the aggregate request; a failed step leaves the synthesized output
as it was; a step with nothing to show (no synthesized output, every new proposal failed)
answers Q alone, as a MoA layer does after a failed layer. No random choice is made.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from math import ceil

from pydantic import Field

from toa.methods.base import Method, MethodContext, Options, register, score_all, user
from toa.methods.moa import aggregate_messages
from toa.rows import Generation, Message, MethodOutput, Sample

DEFAULT_PROPOSALS = 6  # as many samples as MoA's setup has proposers (arXiv 2406.04692)


class SelfMoAOptions(Options):
    agent: str | None = Field(None, description="The one agent that proposes and aggregates; None: the first configured agent.")
    proposals: int = Field(DEFAULT_PROPOSALS, ge=2, description="Most samples of the prompt per round; each round's samples are aggregated into one synthesized output. The budget is split into as few rounds as this allows.")
    window: int | None = Field(None, ge=2, description="Self-MoA-Seq: most responses one aggregation sees, the current synthesized output included; None: a round's samples are aggregated all at once.")


def steps_for(generations: int, window: int | None) -> int:
    """Aggregation steps of a round of `generations` >= 2 (S = ceil((r - 1) / w); 1 without a window)."""
    return 1 if window is None else ceil((generations - 1) / window)


def round_cost(proposals: int, window: int | None) -> int:
    """Generations of a full round: K proposals plus the steps that see them all."""
    if window is None or proposals <= window:
        return proposals + 1
    return proposals + 1 + ceil((proposals - window) / (window - 1))


def plan(budget: int, proposals: int, window: int | None) -> list[list[int]]:
    """Per round, the number of new proposals each aggregation step sees (their sum is the
    round's proposals; with the steps, the rounds' generations add up to `budget` >= 2)."""
    rounds = ceil(budget / round_cost(proposals, window))
    base, extra = divmod(budget, rounds)
    return [windows(size - steps_for(size, window), steps_for(size, window), window)
            for size in [base + 1] * extra + [base] * (rounds - extra)]


def windows(proposals: int, steps: int, window: int | None) -> list[int]:
    """New proposals per step: w, then w - 1 each, the last step the rest. S is the fewest steps
    that fit, so at most the last step comes out empty (P = (S - 1)(w - 1) + 1); then step 1
    gives it one, so every step sees something new."""
    if window is None:
        return [proposals]
    sizes = [min(window, proposals)]
    while len(sizes) < steps:
        sizes.append(min(window - 1, proposals - sum(sizes)))
    if sizes[-1] == 0:
        sizes[0], sizes[-1] = sizes[0] - 1, 1
    return sizes


@dataclass
class _Round:
    """One round's walk: its proposals, how many new ones each step sees, and where it is."""

    proposals: list[Generation]
    windows: list[int]
    seen: int = 0  # proposals shown so far (failed ones count: their place is fixed)
    synthesized: Generation | None = None  # the round's last successful step

    def request(self, question: str, step: int) -> tuple[list[Message], str | None]:
        """Step `step`'s messages and parent: the synthesized output first, then the next
        window's successful proposals; Q alone when there is nothing to show."""
        new = self.proposals[self.seen: self.seen + self.windows[step]]
        self.seen += self.windows[step]
        shown = ([self.synthesized] if self.synthesized else []) + [g for g in new if g.ok]
        if not shown:
            return user(question), None
        return aggregate_messages(question, [g.text or "" for g in shown]), shown[0].sample_id

    def record(self, gen: Generation) -> None:
        if gen.ok:  # a failed step leaves the synthesized output as it was
            self.synthesized = gen


@register
class SelfMoA(Method):
    """Rounds of one agent's samples, each aggregated by the same agent; every output a sample."""

    name = "self_moa"
    Options = SelfMoAOptions

    def check_budget(self, m: int, n: int) -> None:
        if n * m < 2:
            raise ValueError(f"self_moa needs at least 2 generations per prompt (a sample and its aggregation); "
                             f"n * agents = {n * m}: raise n")

    def agent(self, ctx: MethodContext) -> str:
        chosen = self.options.agent
        if chosen is None:
            return ctx.agents[0]
        if chosen not in ctx.agents:
            raise ValueError(f"self_moa: agent {chosen!r} is not configured; agents: {list(ctx.agents)}")
        return chosen

    async def run(self, ctx: MethodContext) -> MethodOutput:
        self.check_budget(len(ctx.agents), ctx.n)  # a direct call (tests, library use) gets the config's error
        agent = self.agent(ctx)
        walks = plan(ctx.budget, self.options.proposals, self.options.window)
        # every round's samples in one request (the server shares the prefill), split round-major
        proposals = await ctx.generate(agent, user(ctx.prompt.text), sum(sum(w) for w in walks))
        rounds, start = [], 0
        for w in walks:
            rounds.append(_Round(proposals[start: start + sum(w)], w))
            start += sum(w)
        issued = [(g, None, 0) for g in proposals]  # (generation, parent, depth) in generation order
        for step in range(max(len(w) for w in walks)):
            issued += await self._step(ctx, agent, [r for r in rounds if step < len(r.windows)], step)
        scores = await score_all(ctx, [g for g, _, _ in issued])
        return MethodOutput([Sample(g, score, f"{agent}_{depth}", parent, depth, order)
                             for order, ((g, parent, depth), score) in enumerate(zip(issued, scores))])

    async def _step(self, ctx: MethodContext, agent: str, rounds: list[_Round], step: int):
        """Step `step` of every round still walking, asked at once in round order: gather starts
        its tasks in argument order, so two identical requests get their slots by round, never
        by which earlier call returned first (as Sequential Refine's chains, docs/methods.md §3.1)."""
        requests = [r.request(ctx.prompt.text, step) for r in rounds]
        gens = await asyncio.gather(*(ctx.generate(agent, messages, 1) for messages, _ in requests))
        out = []
        for r, (_, parent), (gen,) in zip(rounds, requests, gens):
            r.record(gen)
            out.append((gen, parent, step + 1))
        return out
