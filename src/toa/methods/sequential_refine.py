"""Sequential Refine (docs/methods.md §3; a baseline of the TOA paper, arXiv 2412.17061).

n independent chains of M steps. Chain k answers with a permutation of the M agents: the first
agent answers Q, every next agent refines the response produced just before it (refine
template). n * M samples, all scored against the original Q at the end, in one reward call.

Action label, reference quirk kept: `<agent>.round_<k*M>_iter_<j>` (the reference's round
counter steps by M). depth = j (the position in the chain), parent = the previous response.

Decisions where the rules are silent:
- The permutation of chain k comes from random.Random(f"{seed}:{prompt_id}:{k}"): it depends on
  the run seed, the prompt and the chain only, never on global RNG state or on call timing, so
  a rerun (or a resume) draws the same chains. The reference shuffled a global RNG.
- Chains are independent, so they run concurrently (asyncio.gather); samples are returned in
  chain-major order (order = k * M + j).
- A failed step is kept as a Sample with its error; the next agent refines the last successful
  response of the chain (its parent), or answers Q afresh if there is none yet.
"""

from __future__ import annotations

import asyncio
import random

from toa.methods.base import Method, MethodContext, register, score_all, user
from toa.rows import Generation, MethodOutput, Sample
from toa.templates import load


def chain_order(ctx: MethodContext, chain: int) -> list[str]:
    """The seeded permutation of the agents for one chain."""
    agents = list(ctx.agents)
    random.Random(f"{ctx.seed}:{ctx.prompt.prompt_id}:{chain}").shuffle(agents)
    return agents


async def _chain(ctx: MethodContext, agents: list[str]) -> list[tuple[str, Generation, str | None]]:
    """One chain: (agent, generation, parent sample id) per step."""
    refine = load("refine")
    steps: list[tuple[str, Generation, str | None]] = []
    last_ok: Generation | None = None
    for agent in agents:
        text = ctx.prompt.text if last_ok is None else \
            refine.render(question=ctx.prompt.text, answer=last_ok.text or "")
        gen = (await ctx.generate(agent, user(text), 1))[0]
        steps.append((agent, gen, last_ok.sample_id if last_ok else None))
        if gen.ok:
            last_ok = gen
    return steps


@register
class SequentialRefine(Method):
    """n chains, each a seeded permutation of the agents refining one another in turn."""

    name = "sequential_refine"

    async def run(self, ctx: MethodContext) -> MethodOutput:
        m = len(ctx.agents)
        chains = await asyncio.gather(*(_chain(ctx, chain_order(ctx, k)) for k in range(ctx.n)))
        steps = [(k, j, *step) for k, chain in enumerate(chains) for j, step in enumerate(chain)]
        scores = await score_all(ctx, [gen for *_, gen, _ in steps])
        return MethodOutput([
            Sample(gen, score, f"{agent}.round_{k * m}_iter_{j}", parent, depth=j, order=k * m + j)
            for (k, j, agent, gen, parent), score in zip(steps, scores)
        ])
