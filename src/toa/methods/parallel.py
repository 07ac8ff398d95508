"""Random sampling and Parallel Ensemble (methods.md §1).

Random: one agent (the first configured) draws N = n * M samples from the prompt alone.
Parallel Ensemble: every agent draws n samples. Both ask for all of an agent's samples in one
request (`n=`), which lets vLLM share the prompt prefill. Action label: the agent name.
"""

from __future__ import annotations

import asyncio

from toa.methods.base import MethodContext, register, score_all, user
from toa.rows import MethodOutput, Sample


async def _draw(ctx: MethodContext, counts: dict[str, int]) -> MethodOutput:
    messages = user(ctx.prompt.text)
    per_agent = await asyncio.gather(*(ctx.generate(a, messages, k) for a, k in counts.items()))
    generations = [g for gens in per_agent for g in gens]
    scores = await score_all(ctx, generations)
    return MethodOutput([Sample(g, s, action=g.agent, order=i) for i, (g, s) in enumerate(zip(generations, scores))])


@register
class Random:
    """Best-of-N from one agent, N = n * number of agents (equal budget)."""

    name = "random"

    async def run(self, ctx: MethodContext) -> MethodOutput:
        return await _draw(ctx, {ctx.agents[0]: ctx.budget})


@register
class ParallelEnsemble:
    """n samples from each agent, all from the prompt alone."""

    name = "parallel_ensemble"

    async def run(self, ctx: MethodContext) -> MethodOutput:
        return await _draw(ctx, {a: ctx.n for a in ctx.agents})
