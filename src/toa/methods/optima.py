"""Optima two-agent dialogue (Chen et al. 2024, "Optima: Optimizing Effectiveness and Efficiency
for LLM-Based Multi-Agent System", arXiv 2410.08115), as a toa method named `optima`.

Two speakers (the first two configured agents unless `speakers` names them; one agent may play
both) talk about the prompt, taking turns; a round is one utterance by each.
- mode "critic" (default): the first speaker solves, the second points out errors without
  answering; only the solver's replies carry answers, and the critic never speaks last (a
  critique nobody answers changes nothing).
- mode "split": information-split. The prompt's sentences are split in two halves, one per
  speaker; a trailing question sentence ("...?") is shown to both. Both speakers answer.

A dialogue stops when two consecutive parsed answers (of answer-carrying utterances, parsed by
toa.reward.math_verify.extract_answer) agree, at `max_rounds` (default 10), when its utterances
reach `max_dialogue_tokens` (off by default), or when a generation fails. Every utterance is
capped at `max_tokens` tokens (the utterance-length limit; default: the agent's own sampling).

Budget (decision; keeps methods comparable in DIALOGUES, not generations): one prompt gets
`branching` = [k0, k1, ...] alternatives at turns 0, 1, ...: a tree whose product(k) leaves are
the dialogues. Default: n * len(agents) dialogues (the other methods' sample count), split as
[a, b] with a the largest divisor <= sqrt(budget) (4 -> [2, 2], 6 -> [2, 3]; a prime budget
branches at turn 0 only). The k alternatives of a turn are one request with n=k, so shared
prefixes are generated once. Generations spent = sum over the tree's nodes: compare methods at
equal tokens with the `reward_vs_tokens` view.

Dialogue reward (`reward`):
- "correctness": 1/0 from math_verify against prompt.reference for the final answer (the last
  answer-carrying utterance); a prompt without a usable reference is an error row, never a 0.
- "composite" (default, Optima's): correctness + lambda_tokens * tokens / T_max
  + lambda_loss / max_loss, where tokens = the dialogue's completion tokens, T_max = the largest
  over this prompt's dialogues, and max_loss = the worst (largest) per-utterance mean token loss
  -mean_logprob. That loss is measured under the model that SPOKE the utterance (its sampling
  logprobs), not under a model being trained as in Optima; it is floored at `loss_floor`.
  Defaults lambda_tokens = -0.5 (shorter is better), lambda_loss = 0.8. Needs logprobs from the
  servers: every utterance is requested with logprobs=True (whatever `reward` is, so that
  switching it replays the same dialogues); without them the dialogue's reward is an error row.
- "reward_model": the run's reward model scores the final answer against the original prompt.

Provenance: every utterance is a Sample (agent = speaker, action "<role>_r<round>" with roles
solver/critic or a/b, parent_id = the previous utterance, depth = turn, order = depth-first
position). The dialogue reward sits on each dialogue's last utterance; earlier utterances carry
a "skipped" score (their value, the mean reward of the dialogues below them, is on their tree
node). TreeNodes: a root plus one "response" node per utterance. One `dialogues` row per
dialogue (stop reason, final answer, reward parts, the utterance ids root to leaf).

Datasets (`datasets`, used by tasks/datasets.py instead of best-vs-ranked): SFT = the best
dialogue per prompt, one chat example per speaker (its view: its instructions, the partner's
utterances as user turns, its own as assistant turns, ending on its last own turn). DPO = at
every branch point, the best child vs the worst child by subtree mean reward when the gap is at
least `dpo_margin` (default 0.1): prompt = the speaker's view before that turn (`prompt` flat,
`prompt_messages` as chat JSON), chosen / rejected = the two utterances.

Decisions: branches run concurrently; node order and ids come from a depth-first walk in
generation order afterwards, so they do not depend on timing. A failed utterance ends its
dialogue with an error score (errors are rows). Empty utterances are sent as "(no reply)".
"""

from __future__ import annotations

import asyncio
import json
import math
from dataclasses import dataclass, field
from typing import Literal

from pydantic import Field, model_validator

from toa.dialogue import ROLES, view
from toa.methods.base import Method, MethodContext, Options, register
from toa.reward.math_verify import extract_answer, same_number, score_one
from toa.rows import (
    ERROR,
    SKIPPED,
    DialogueRecord,
    Generation,
    MethodOutput,
    Prompt,
    Sample,
    Score,
    TreeNode,
)


# ------------------------------------------------------------------------------ options
class OptimaOptions(Options):
    mode: Literal["critic", "split"] = Field("critic", description="critic: a solver and a critic; split: each speaker sees half of the prompt.")
    max_rounds: int = Field(10, ge=1, description="Most rounds (one utterance by each speaker).")
    max_tokens: int | None = Field(None, ge=1, description="Per-utterance token cap (a sampling override, part of the call's identity); None: the agent's own.")
    max_dialogue_tokens: int | None = Field(None, ge=1, description="A dialogue stops once its utterances reach this many completion tokens; None: off.")
    branching: tuple[int, ...] | None = Field(None, min_length=1, description="Alternatives per turn [k0, k1, ...]; None: n * agents dialogues split in two levels.")
    speakers: tuple[str, ...] | None = Field(None, description="The two speaking agents (may repeat one); None: the first two configured.")
    reward: Literal["correctness", "composite", "reward_model"] = Field("composite", description="How a dialogue is scored (module docstring).")
    lambda_tokens: float = Field(-0.5, description="Weight of the dialogue's relative token count in the composite reward.")
    lambda_loss: float = Field(0.8, description="Weight of 1 / (worst utterance loss) in the composite reward.")
    loss_floor: float = Field(1e-3, gt=0, description="Floor of the utterance loss in the composite reward.")
    dpo_margin: float = Field(0.1, ge=0, description="Least gap in mean reward between a branch point's best and worst child for a DPO pair.")

    @model_validator(mode="after")
    def _fits(self) -> OptimaOptions:
        if self.speakers is not None and len(self.speakers) != 2:
            raise ValueError(f"speakers must name exactly two agents (may repeat one), got {list(self.speakers)}")
        if self.branching is not None and any(k < 1 for k in self.branching):
            raise ValueError(f"branching must be a non-empty list of counts >= 1, got {list(self.branching)}")
        if self.branching is not None and len(self.branching) > self.max_turns:
            raise ValueError(f"branching has {len(self.branching)} levels but a dialogue has at most "
                             f"{self.max_turns} turns (max_rounds {self.max_rounds}, mode {self.mode})")
        return self

    @property
    def max_turns(self) -> int:
        # critic mode: the critic does not speak in the last round
        return 2 * self.max_rounds - (1 if self.mode == "critic" else 0)


def default_branching(budget: int) -> tuple[int, ...]:
    a = max(d for d in range(1, math.isqrt(budget) + 1) if budget % d == 0)
    return (budget,) if a == 1 else (a, budget // a)


# ------------------------------------------------------------------------------ the tree
@dataclass
class Turn:
    gen: Generation
    speaker: int
    depth: int
    parent: Turn | None
    answer: float | None  # parsed answer, answer-carrying utterances only
    children: list[Turn] = field(default_factory=list)
    stop: str | None = None  # why the dialogue ended here (leaves only)

    def path(self) -> list[Turn]:
        node, out = self, []
        while node is not None:
            out.append(node)
            node = node.parent
        return out[::-1]


@dataclass
class Dialogue:
    leaf: Turn
    score: Score
    correct: float | None = None
    tokens: int = 0
    max_loss: float | None = None
    final_answer: float | None = None


@register
class Optima(Method):
    """Two agents in dialogue (solver/critic or information-split), branched into a tree."""

    name = "optima"
    Options = OptimaOptions

    @property
    def opt(self) -> OptimaOptions:
        return self.options

    def generations(self, m: int, n: int) -> None:
        return None  # a dialogue's length depends on when its answers agree

    # -------------------------------------------------------------------- sampling
    async def run(self, ctx: MethodContext) -> MethodOutput:
        speakers = self._speakers(ctx)
        branching = self.opt.branching or default_branching(ctx.budget)
        # logprobs always (every reward kind records max_loss, and switching `reward` then
        # replays the same dialogues from the record); on vLLM CPU they cost 4-14 % throughput (by CPU)
        sampling = {"logprobs": True, **({"max_tokens": self.opt.max_tokens} if self.opt.max_tokens else {})}
        roots = await self._grow(ctx, speakers, branching, sampling, None)
        turns = [t for r in roots for t in _walk(r)]  # depth-first, generation order
        dialogues = await self._score(ctx, [t for t in turns if t.stop is not None])
        return self._output(ctx, speakers, turns, dialogues)

    def _speakers(self, ctx: MethodContext) -> tuple[str, str]:
        names = self.opt.speakers or (ctx.agents[0], ctx.agents[1 if len(ctx.agents) > 1 else 0])
        unknown = [a for a in names if a not in ctx.agents]
        if unknown:
            raise ValueError(f"optima speakers {unknown} are not configured agents {list(ctx.agents)}")
        return names[0], names[1]

    async def _grow(self, ctx, speakers, branching, sampling, parent: Turn | None) -> list[Turn]:
        """Generate the next turn after `parent` (k alternatives at a branching turn) and
        continue each alternative until its dialogue stops; returns the new children."""
        depth = 0 if parent is None else parent.depth + 1
        speaker = depth % 2
        history = [(t.speaker, t.gen.text or "") for t in parent.path()] if parent else []
        k = branching[depth] if depth < len(branching) else 1
        messages = view(ctx.prompt.text, self.opt.mode, speaker, history)
        gens = await ctx.generate(speakers[speaker], messages, k, **sampling)
        children = [Turn(g, speaker, depth, parent, self._answer(g, speaker)) for g in gens]
        for child in children:
            child.stop = self._stop(child)
        await asyncio.gather(*(self._grow(ctx, speakers, branching, sampling, c) for c in children if c.stop is None))
        if parent is not None:
            parent.children = children
        return children

    def _answer(self, gen: Generation, speaker: int) -> float | None:
        carries = self.opt.mode == "split" or speaker == 0  # the critic gives no answers
        return extract_answer(gen.text) if carries and gen.ok and gen.text else None

    def _stop(self, turn: Turn) -> str | None:
        if not turn.gen.ok:
            return "error"
        path = turn.path()
        answers = [t.answer for t in path if self.opt.mode == "split" or t.speaker == 0]
        if len(answers) >= 2 and answers[-1] is not None and answers[-2] is not None \
                and same_number(answers[-1], answers[-2]) and turn.answer is not None:
            return "agree"
        if turn.depth + 1 >= self.opt.max_turns:
            return "max_rounds"
        if self.opt.max_dialogue_tokens and sum(t.gen.completion_tokens for t in path) >= self.opt.max_dialogue_tokens:
            return "max_dialogue_tokens"
        return None

    # -------------------------------------------------------------------- rewards
    async def _score(self, ctx: MethodContext, leaves: list[Turn]) -> list[Dialogue]:
        dialogues = [self._measure(ctx.prompt, leaf) for leaf in leaves]
        live = [d for d in dialogues if d.leaf.gen.ok]
        if self.opt.reward == "reward_model" and live:
            scores = await ctx.reward([_final_text(d.leaf) or "" for d in live])
            for d, s in zip(live, scores):
                d.score = s
        elif self.opt.reward == "composite":
            t_max = max((d.tokens for d in live), default=0)
            for d in live:
                d.score = self._composite(d, t_max)
        return dialogues

    def _measure(self, prompt: Prompt, leaf: Turn) -> Dialogue:
        path = leaf.path()
        if not leaf.gen.ok:
            return Dialogue(leaf, Score(None, ERROR, f"dialogue failed at turn {leaf.depth}: {leaf.gen.error}"))
        final = _final_text(leaf)
        correct = score_one(prompt, final or "")
        losses = [-t.gen.mean_logprob if t.gen.mean_logprob is not None else None for t in path]
        d = Dialogue(leaf, correct, correct.value, sum(t.gen.completion_tokens for t in path),
                     None if None in losses else max(losses),
                     next((t.answer for t in reversed(path) if t.answer is not None), None))
        return d

    def _composite(self, d: Dialogue, t_max: int) -> Score:
        if d.correct is None:
            return Score(None, ERROR, f"composite reward needs correctness: {d.score.error}")
        if d.max_loss is None:
            return Score(None, ERROR, "composite reward needs token logprobs and the server returned none "
                                      "(is the endpoint's supports_logprobs off? else use reward = 'correctness')")
        tokens = d.tokens / t_max if t_max else 0.0
        value = d.correct + self.opt.lambda_tokens * tokens + self.opt.lambda_loss / max(d.max_loss, self.opt.loss_floor)
        return Score(value)

    # -------------------------------------------------------------------- rows
    def _output(self, ctx, speakers, turns: list[Turn], dialogues: list[Dialogue]) -> MethodOutput:
        roles = ROLES[self.opt.mode]
        by_leaf = {id(d.leaf): d for d in dialogues}
        below = _leaf_rewards(turns, by_leaf)
        samples, nodes = [], [TreeNode("n0", None, "root", None, 0, len(dialogues), *_mean(
            [d.score.value for d in dialogues if d.score.ok]), None, 0)]
        node_id = {}
        for i, t in enumerate(turns):
            d = by_leaf.get(id(t))
            score = d.score if d else Score(None, SKIPPED, "intermediate utterance: the dialogue reward is on its last utterance")
            samples.append(Sample(t.gen, score, f"{roles[t.speaker]}_r{t.depth // 2 + 1}",
                                  t.parent.gen.sample_id if t.parent else None, t.depth, i))
            node_id[id(t)] = f"n{i + 1}"
            values = below[id(t)]
            nodes.append(TreeNode(f"n{i + 1}", node_id[id(t.parent)] if t.parent else "n0", "response", t.gen.agent,
                                  t.depth + 1, len(values[1]), *_mean(values[0]), t.gen.sample_id, i + 1))
        rows = [self._dialogue_row(d, speakers) for d in dialogues]
        return MethodOutput(samples, nodes, tables={"dialogues": rows})

    def _dialogue_row(self, d: Dialogue, speakers) -> DialogueRecord:
        """The `dialogues` row of one dialogue, less its keys (the engine adds run, method,
        batch and prompt)."""
        path = d.leaf.path()
        return DialogueRecord(
            dialogue_id=d.leaf.gen.sample_id, mode=self.opt.mode, speakers=json.dumps(list(speakers)),
            turns=len(path), stop_reason=d.leaf.stop,
            final_answer=None if d.final_answer is None else repr(d.final_answer),
            correct=d.correct, tokens=d.tokens, max_loss=d.max_loss, reward_kind=self.opt.reward,
            reward=d.score.value, reward_status=d.score.status, reward_error=d.score.error,
            utterance_ids=json.dumps([t.gen.sample_id for t in path]),
        )

    # -------------------------------------------------------------------- datasets
    def datasets(self, samples, prompts, read, rejected_rank: int):
        """SFT (best dialogue, one example per speaker) and DPO (branch-point pairs) rows for
        one batch of this method's stored samples; `read(table)` gives its dialogues."""
        from toa.optima_datasets import build_dialogue_datasets

        return build_dialogue_datasets(samples, prompts, read("dialogues"), self.opt.dpo_margin)


def _walk(turn: Turn):
    yield turn
    for c in turn.children:
        yield from _walk(c)


def _final_text(leaf: Turn) -> str | None:
    """The last answer-carrying utterance of the dialogue (the dialogue's final answer)."""
    for t in reversed(leaf.path()):
        if t.answer is not None:
            return t.gen.text
    return next((t.gen.text for t in reversed(leaf.path()) if t.speaker == 0 and t.gen.ok), None)


def _leaf_rewards(turns: list[Turn], by_leaf: dict[int, Dialogue]) -> dict[int, tuple[list[float], list[int]]]:
    """Per node: (ok rewards of the dialogues below it, ids of those dialogues)."""
    out: dict[int, tuple[list[float], list[int]]] = {id(t): ([], []) for t in turns}
    for key, d in by_leaf.items():
        for t in d.leaf.path():
            out[id(t)][1].append(key)
            if d.score.ok:
                out[id(t)][0].append(d.score.value)
    return out


def _mean(values: list[float]) -> tuple[float | None, int]:
    return (sum(values) / len(values) if values else None), len(values)
