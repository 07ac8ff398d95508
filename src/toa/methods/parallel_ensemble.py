"""Parallel Ensemble (docs/methods.md §1): n samples from every agent, all from the prompt
alone; each agent's n in one request. Action label: the agent name."""

from __future__ import annotations

from toa.methods.base import Method, MethodContext, register
from toa.methods.random import draw
from toa.rows import MethodOutput


@register
class ParallelEnsemble(Method):
    """n samples from each agent, all from the prompt alone."""

    name = "parallel_ensemble"

    async def run(self, ctx: MethodContext) -> MethodOutput:
        return await draw(ctx, {a: ctx.n for a in ctx.agents})
