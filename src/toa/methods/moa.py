"""Mixture of Agents, the TOA paper's variant (docs/methods.md §4; arXiv 2412.17061).

n rounds of M generations (one per agent, in the configured order) = n * M samples. Rounds are
grouped into stacks of `n_iter` layers (default 4, the paper's; 3 for translation); stacks
repeat until n rounds have run, the last one cut short when n is not a multiple of n_iter.

- Layer 0 of a stack: every agent answers Q alone (one user message).
- Layer l > 0: every agent gets the same SYSTEM message, aggregate.txt's fixed instruction
  followed by the previous layer's responses as `## Response i:` blocks in agent order, and Q
  as the user message. With `num_aggregation` < the number of responses, they are shuffled
  (seeded) and the first num_aggregation kept, as in the reference.
- There is no final aggregator: every layer's outputs are samples, scored against the original
  Q in one reward call at the end. A layer's M generations go out concurrently.

Label `<agent>_<layer>` (layer within its stack), depth = layer, order = round * M + agent index.

Decisions where the rules are silent:
- parent_id = the agent's own response in the previous layer (one of the aggregated ones), so
  that a lineage per agent can be followed; None in layer 0. All aggregated sample ids of a
  layer are the previous round's samples, recoverable from `order`.
- Failed responses (generation error) are left out of the next layer's aggregation; if a whole
  layer failed, the next layer answers Q alone (as a layer 0 would) and has no parent. A failed
  agent's own response is not aggregated, so its next sample's parent_id is None.
- The shuffle for num_aggregation uses random.Random(f"{seed}:{prompt_id}:moa:{round}").
"""

from __future__ import annotations

import asyncio
import random

from pydantic import Field

from toa.methods.base import Method, MethodContext, Options, register, score_all, user
from toa.rows import Generation, Message, MethodOutput, Sample
from toa.templates import load

DEFAULT_N_ITER = 4


def aggregate_messages(question: str, responses: list[str]) -> list[Message]:
    """System = aggregator instruction + numbered responses; user = the original question."""
    packed = "\n\n".join(f"## Response {i}:\n{text}" for i, text in enumerate(responses, 1))
    return [{"role": "system", "content": load("aggregate").render(responses=packed)},
            {"role": "user", "content": question}]


class MoAOptions(Options):
    n_iter: int = Field(DEFAULT_N_ITER, ge=1, description="Layers per pass: layer r aggregates layer r-1 unless r % n_iter == 0, which answers the prompt afresh.")
    num_aggregation: int | None = Field(None, ge=1, description="Most previous-layer responses shown to an aggregator (None: all of them).")


@register
class MoA(Method):
    """Layers of all agents, each layer aggregating the previous one; every output a sample."""

    name = "moa"
    Options = MoAOptions

    @property
    def n_iter(self) -> int:
        return self.options.n_iter

    @property
    def num_aggregation(self) -> int | None:
        return self.options.num_aggregation

    async def run(self, ctx: MethodContext) -> MethodOutput:
        rounds: list[tuple[list[Generation], list[str | None]]] = []
        previous: list[Generation] = []
        for r in range(ctx.n):
            aggregated = self._aggregated(ctx, r, previous) if r % self.n_iter > 0 else {}
            messages = aggregate_messages(ctx.prompt.text, [g.text or "" for g in aggregated.values()]) \
                if aggregated else user(ctx.prompt.text)
            gens = await asyncio.gather(*(ctx.generate(a, messages, 1) for a in ctx.agents))
            previous = [g[0] for g in gens]
            parents = [aggregated[a].sample_id if a in aggregated else None for a in ctx.agents]
            rounds.append((previous, parents))
        generations = [g for gens, _ in rounds for g in gens]
        scores = iter(await score_all(ctx, generations))
        m = len(ctx.agents)
        return MethodOutput([
            Sample(g, next(scores), f"{agent}_{r % self.n_iter}", parent, r % self.n_iter, r * m + i)
            for r, (gens, parents) in enumerate(rounds)
            for i, (agent, g, parent) in enumerate(zip(ctx.agents, gens, parents))
        ])

    def _aggregated(self, ctx: MethodContext, r: int, previous: list[Generation]) -> dict[str, Generation]:
        """{agent: response} of the previous layer's successful responses, in agent order
        (a seeded random subset when capped by num_aggregation; dicts keep insertion order)."""
        ok = [(a, g) for a, g in zip(ctx.agents, previous) if g.ok]
        if self.num_aggregation is not None and self.num_aggregation < len(ok):
            random.Random(f"{ctx.seed}:{ctx.prompt.prompt_id}:moa:{r}").shuffle(ok)
            ok = ok[: self.num_aggregation]
        return dict(ok)
