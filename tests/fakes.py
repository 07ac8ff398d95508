"""Deterministic in-process fakes of a method's `generate` and `reward` callables, shared by
the method and tree-view unit tests. The generator reproduces the conformance mock of
docs/methods.md §5.11: reply k (1-based per prompt) has raw reward base[agent] + 0.05 if refined +
((k*37 mod 11) - 5)/100, encoded in the text, which FakeReward reads back."""

from __future__ import annotations

import asyncio
import re

from toa.rows import ERROR, Generation, Score, content_key

Q = "Explain why the sky is blue."
AGENTS = ("A", "B", "C", "D")
BASE = {"A": 0.10, "B": 0.05, "C": 0.00, "D": -0.05}


def next_sample_id(slots: dict, agent, messages) -> str:
    """A content-addressed id for the next slot of (agent, messages), as the request layer makes."""
    key = content_key(agent, messages)
    slot = slots[key] = slots.get(key, -1) + 1
    return content_key(agent, messages, slot)[:16]


class FakeGenerate:
    """Deterministic generate. The reply text encodes the agent, k (1-based index of the
    generation within this prompt), whether the call was a refinement (any message other than
    the original prompt as one user message) and the conformance mock's raw reward."""

    def __init__(self, prompt: str = Q, fail_k: frozenset[int] = frozenset(), body=None):
        self.prompt, self.fail_k, self.body = prompt, fail_k, body  # body(k): extra lines of text
        self.k, self.slots, self.calls = 0, {}, []
        self.in_flight = self.max_in_flight = 0

    def is_refinement(self, messages) -> bool:
        return messages != [{"role": "user", "content": self.prompt}]

    async def __call__(self, agent, messages, n):
        self.calls.append((agent, messages, n))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        await asyncio.sleep(0)  # let concurrent callers overlap, as a real server would
        self.in_flight -= 1
        return [self._one(agent, messages) for _ in range(n)]

    def _one(self, agent, messages) -> Generation:
        self.k += 1
        sid = next_sample_id(self.slots, agent, messages)
        if self.k in self.fail_k:
            return Generation(sid, agent, None, status=ERROR, error="server down")
        refined = self.is_refinement(messages)
        raw = round(BASE[agent] + (0.05 if refined else 0) + ((self.k * 37 % 11) - 5) / 100, 6)
        text = f"{agent}|k={self.k}|refined={int(refined)}"
        text += f"\n{self.body(self.k)}\nraw={raw}" if self.body else f"|raw={raw}"
        return Generation(sid, agent, text, "stop", 10 + self.k, 5, 0.01)

    @property
    def n_generations(self) -> int:
        return sum(n for _, _, n in self.calls)

    def contents(self) -> set[str]:
        return {m["content"] for _, messages, _ in self.calls for m in messages}


class FakeReward:
    """Deterministic reward bound to the original prompt: the raw value encoded in the text
    (or a constant); records every text it was asked to score."""

    def __init__(self, constant: float | None = None, scale: float = 1.0, fail_k: frozenset[int] = frozenset(),
                 refine_penalty: float = 0.0, offset: float = 0.0):
        self.constant, self.scale, self.offset, self.fail_k, self.seen = constant, scale, offset, fail_k, []
        self.refine_penalty = refine_penalty  # subtracted from refinements: they never improve

    async def __call__(self, texts):
        self.seen.extend(texts)
        return [self._one(t) for t in texts]

    def _one(self, text: str) -> Score:
        if int(re.search(r"k=(\d+)", text).group(1)) in self.fail_k:
            return Score(None, ERROR, "reward model down")
        raw = float(text.rsplit("raw=", 1)[1]) - (self.refine_penalty if "refined=1" in text else 0.0)
        return Score(self.constant if self.constant is not None else raw * self.scale + self.offset)
