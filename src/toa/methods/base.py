"""The one method interface (TOA paper, arXiv 2412.17061, and ../spec/methods.md).

A method is plain async Python: it gets the prompt, the configured agents in their fixed
order, n (samples per agent), and two callables, and returns every sample it generated with its
provenance (a `MethodOutput`; tree methods add their nodes). It knows nothing of Prefect, HTTP or storage, which is what lets the same code run
on deterministic in-process fakes (unit tests, conformance vectors), on real servers, and on a
replay of the request cache (resume).

Budget rule (methods.md): every multi-agent method makes exactly n * len(agents) generations per
prompt; single-agent methods are given N = n * len(agents) so budgets are equal.

`generate(agent, messages, n)` returns n `Generation`s for that agent (an error replaces a
sample, it never disappears). It is content-addressed: asking the same agent the same messages
again yields the next sample slot, so a method never passes seeds or indices itself.
`reward(texts)` scores responses against the ORIGINAL prompt and returns one `Score` each.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Awaitable, Callable, ClassVar, Protocol, Sequence

from toa.rows import Generation, MethodOutput, Prompt, Score

Message = dict[str, str]  # {"role": ..., "content": ...}
Generate = Callable[[str, list[Message], int], Awaitable[list[Generation]]]
Reward = Callable[[Sequence[str]], Awaitable[list[Score]]]


@dataclass(frozen=True)
class MethodContext:
    prompt: Prompt
    agents: tuple[str, ...]  # configured order, never a directory listing
    n: int  # samples per agent
    generate: Generate
    reward: Reward
    seed: int = 0  # for methods that draw permutations etc.; derive, never use global RNG

    @property
    def budget(self) -> int:
        return self.n * len(self.agents)


class Method(Protocol):
    name: ClassVar[str]

    async def run(self, ctx: MethodContext) -> MethodOutput: ...


_REGISTRY: dict[str, type] = {}


def register(cls: type) -> type:
    """Class decorator: make a method selectable by its `name` in the flow's `methods`."""
    if cls.name in _REGISTRY:
        raise ValueError(f"method name {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def get_method(name: str, **options) -> Method:
    if name not in _REGISTRY:
        raise KeyError(f"unknown method {name!r}; known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name](**options)


def method_names() -> list[str]:
    return sorted(_REGISTRY)


def user(text: str) -> list[Message]:
    return [{"role": "user", "content": text}]


async def score_all(ctx: MethodContext, generations: Sequence[Generation]) -> list[Score]:
    """Score generations against the original prompt; a failed generation gets an error score
    (there is nothing to score) rather than a reward call on None."""
    ok = [g for g in generations if g.ok]
    scores = iter(await ctx.reward([g.text or "" for g in ok]) if ok else [])
    return [next(scores) if g.ok else Score(None, "error", "generation failed") for g in generations]
