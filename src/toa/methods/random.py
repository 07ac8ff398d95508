"""Random sampling (docs/methods.md §1): best-of-N from one agent.

The first configured agent draws N = n * M samples from the prompt alone, in one request
(`n=`), which lets vLLM share the prompt prefill. Action label: the agent name.
"""

from __future__ import annotations

import asyncio

from toa.methods.base import Method, MethodContext, register, score_all, user
from toa.rows import MethodOutput, Sample


async def draw(ctx: MethodContext, counts: dict[str, int]) -> MethodOutput:
    """counts[agent] samples from each agent, each agent's in one request, all scored."""
    messages = user(ctx.prompt.text)
    if len(counts) == 1:  # no task to gather one request into (a task per call costs CPU at scale)
        ((agent, k),) = counts.items()
        per_agent = [await ctx.generate(agent, messages, k)]
    else:
        per_agent = await asyncio.gather(*(ctx.generate(a, messages, k) for a, k in counts.items()))
    generations = [g for gens in per_agent for g in gens]
    scores = await score_all(ctx, generations)
    return MethodOutput([Sample(g, s, action=g.agent, order=i) for i, (g, s) in enumerate(zip(generations, scores))])


@register
class Random(Method):
    """Best-of-N from one agent, N = n * number of agents (equal budget)."""

    name = "random"

    async def run(self, ctx: MethodContext) -> MethodOutput:
        return await draw(ctx, {ctx.agents[0]: ctx.budget})
