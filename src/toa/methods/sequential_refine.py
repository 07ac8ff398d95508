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
- Chains are independent, so they run concurrently, step by step (docs/methods.md §3.1): step j
  of every chain goes out at once, in chain order, after every chain's step j-1 has returned.
  Two chains can send the identical request (same agent, same response to refine: a shared
  first agent, a temperature-0 server); slots follow the order requests are asked, so chains
  running freely would hand those slots out by which earlier call returned first, and a rerun
  could give chain 1 the sample chain 0 had. Step by step, chain order decides. Samples are
  returned in chain-major order (order = k * M + j).
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


async def _step(ctx: MethodContext, agent: str, last_ok: Generation | None) -> Generation:
    """One step of a chain: answer Q, or refine the chain's last successful response."""
    text = ctx.prompt.text if last_ok is None else \
        load("refine").render(question=ctx.prompt.text, answer=last_ok.text or "")
    return (await ctx.generate(agent, user(text), 1))[0]


async def _chains(ctx: MethodContext) -> list[list[tuple[str, Generation, str | None]]]:
    """Every chain's (agent, generation, parent sample id) per step, run step by step: gather
    starts its tasks in argument order and each asks for its slot in its first step, so slots
    follow chain order (docs/methods.md §3.1)."""
    orders = [chain_order(ctx, k) for k in range(ctx.n)]
    chains: list[list[tuple[str, Generation, str | None]]] = [[] for _ in orders]
    last_ok: list[Generation | None] = [None] * ctx.n
    for j in range(len(ctx.agents)):
        gens = await asyncio.gather(*(_step(ctx, order[j], last) for order, last in zip(orders, last_ok)))
        for k, gen in enumerate(gens):
            chains[k].append((orders[k][j], gen, last_ok[k].sample_id if last_ok[k] else None))
            if gen.ok:
                last_ok[k] = gen
    return chains


@register
class SequentialRefine(Method):
    """n chains, each a seeded permutation of the agents refining one another in turn."""

    name = "sequential_refine"

    async def run(self, ctx: MethodContext) -> MethodOutput:
        m = len(ctx.agents)
        chains = await _chains(ctx)
        steps = [(k, j, *step) for k, chain in enumerate(chains) for j, step in enumerate(chain)]
        scores = await score_all(ctx, [gen for *_, gen, _ in steps])
        return MethodOutput([
            Sample(gen, score, f"{agent}.round_{k * m}_iter_{j}", parent, depth=j, order=k * m + j)
            for (k, j, agent, gen, parent), score in zip(steps, scores)
        ])
