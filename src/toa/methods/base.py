"""The one method contract (TOA paper, arXiv 2412.17061; the rules: docs/methods.md).

A method is plain async Python: it gets the prompt, the configured agents in their fixed
order, n (samples per agent), and two callables, and returns every sample it generated with its
provenance (a `MethodOutput`; tree methods add their nodes). It knows nothing of Prefect, HTTP or storage, which is what lets the same code run
on deterministic in-process fakes (unit tests, conformance vectors), on real servers, and on a
replay of the request cache (resume).

Budget rule (docs/methods.md §0): every multi-agent method makes exactly n * len(agents) generations per
prompt; single-agent methods are given N = n * len(agents) so budgets are equal.

`generate(agent, messages, n)` returns n `Generation`s for that agent (an error replaces a
sample, it never disappears). It is content-addressed: asking the same agent the same messages
again yields the next sample slot, so a method never passes seeds or indices itself.
`reward(texts)` scores responses against the ORIGINAL prompt and returns one `Score` each.
"""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from pydantic import BaseModel, ConfigDict, ValidationError

from toa.rows import Generation, Message, MethodOutput, Prompt, Score


class Generate(Protocol):
    """`generate(agent, messages, n, **sampling)`: n generations; `sampling` overrides the
    agent's sampling parameters for this request (e.g. max_tokens, logprobs, vLLM chat extras)
    and is part of the call's identity."""

    def __call__(self, agent: str, messages: list[Message], n: int, **sampling: Any) -> Awaitable[list[Generation]]: ...


class Reward(Protocol):
    def __call__(self, texts: Sequence[str]) -> Awaitable[list[Score]]: ...


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


class Options(BaseModel):
    """A method's options (`method_options.<name>` in the run config). Subclass it with the
    method's fields; checks that span fields go in a pydantic `model_validator`. Validated when
    the run config is, so a typo fails before anything starts."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Method:
    """Base of every method: a registered `name`, an `Options` model, and `run`.

    One instance per run (toa.plan.RunPlan builds them). The hooks below have defaults that
    most methods keep:
    - `check_budget(m, n)`: raise ValueError when the options cannot work with M agents and
      n samples each (checked with the config, before any server starts);
    - `fingerprint()`: what beyond the options changes results (e.g. the method's own
      template files); it enters the run id;
    - `datasets(...)`: SFT and DPO rows from the stored samples (default: best vs ranked).
    """

    name: ClassVar[str]
    Options: ClassVar[type[Options]] = Options

    def __init__(self, options: Options | None = None):
        self.options = options if options is not None else self.Options()

    def __eq__(self, other: object) -> bool:  # a copy (pickled to a worker) equals its original
        return type(other) is type(self) and other.options == self.options

    __hash__ = None  # options may hold lists: not hashable

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options!r})"

    @classmethod
    def from_options(cls, raw: dict[str, Any]) -> Method:
        """The method with `raw` options validated; a bad option raises ValueError naming it."""
        try:
            return cls(cls.Options.model_validate(raw or {}))
        except ValidationError as exc:
            raise ValueError(_explain(cls.name, exc, list(cls.Options.model_fields))) from None

    def check_budget(self, m: int, n: int) -> None:
        """Every method works with any M >= 1 and n >= 1 unless it says otherwise."""

    def generations(self, m: int, n: int) -> int | None:
        """Generations per prompt for M agents and n samples each: the equal budget n * M
        (docs/methods.md §0); None when it depends on the answers (dialogues, step search)."""
        return n * m

    def fingerprint(self) -> dict[str, Any]:
        return {}

    def datasets(self, samples, prompts, read, rejected_rank: int):
        """(sft, dpo) frames for one batch of this method's stored samples; `read(table)` gives
        the batch's rows of the method's other tables. Default: toa.datasets' best-vs-ranked rule."""
        from toa.datasets import build_dpo, build_sft

        return build_sft(samples, prompts), build_dpo(samples, prompts, rejected_rank)

    async def run(self, ctx: MethodContext) -> MethodOutput:
        raise NotImplementedError


def _explain(name: str, exc: ValidationError, known: list[str]) -> str:
    """`<method>: <option>: <problem>; ...`, one style for every method's options."""
    problems = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            problems.append(f"unknown option {where!r}; known: {', '.join(known) or 'none'}")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            problems.append(f"{where}: {msg}" if where else msg)
    return f"{name}: " + "; ".join(problems)


_REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method selectable by its `name` in the flow's `methods`. The
    module defining it is named after it (toa.methods.<name>)."""
    if cls.name in _REGISTRY:
        raise ValueError(f"method name {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def method_class(name: str) -> type[Method]:
    if name not in _REGISTRY:
        raise KeyError(f"unknown method {name!r}; known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def get_method(name: str, **options: Any) -> Method:
    return method_class(name).from_options(options)


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
