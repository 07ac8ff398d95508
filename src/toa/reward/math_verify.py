"""Verifiable reward for GSM8K-style prompts: 1.0 when the response's final answer equals the
gold number in `prompt.reference`, else 0.0.

Why this exists: on a CPU box no reward model ships in a package and a 135M judge carries no
signal (design.md), so prompts with known answers give the default run a reward that is both
real and meaningful.

Extraction order (the last match of the first rule that matches wins, since models restate
intermediate numbers before the final one):
1. \\boxed{...} (balanced braces; \\frac{a}{b} and a/b inside are evaluated),
2. "answer is X", "answer: X", "#### X",
3. else the LAST number in the text.
Normalisation: unicode minus, "$", "%", thousands separators and trailing ".0" are dropped;
comparison is numeric with absolute tolerance 1e-6 (relative for large numbers).

A response with no number scores 0.0: it is a wrong answer, which is a real reward. A prompt
with no reference (or a reference that is not a number) is an error Score: there is nothing to
compare to, and that must never look like a wrong answer.
"""

from __future__ import annotations

import asyncio
import math
import re
from fractions import Fraction

from toa.rows import ERROR, OK, Prompt, Score

IDENTITY = "math_verify:v1"  # bump on any change to extraction or comparison: it keys the cache
TOLERANCE = 1e-6

# a sign only where it cannot be a subtraction or range dash ("3-4" is 3 and 4, not -4)
_NUMBER = r"(?:(?<![\w)\]}])-\s*)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|(?:(?<![\w)\]}])-)?\.\d+"
_NUMBER_RE = re.compile(_NUMBER)
_FRAC_RE = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_SLASH_RE = re.compile(rf"^\s*({_NUMBER})\s*/\s*({_NUMBER})\s*$")
_ANSWER_RE = re.compile(
    rf"(?:answer\s*(?:is|:|=)|####)\s*(?:[a-z\s]{{0,12}}?[:=]?\s*)?({_NUMBER})", re.IGNORECASE
)


def _clean(text: str) -> str:
    """Unify the spellings models use for the same number."""
    text = text.replace("\u2212", "-").replace("\u2013", "-").replace("$", "").replace("%", "")
    text = text.replace("\\!", "").replace("{,}", ",").replace("\\,", "")  # LaTeX spacing / commas
    return text


def to_number(token: str) -> float | None:
    """'1,234' -> 1234.0, '-3.50' -> -3.5; None if not a number."""
    token = re.sub(r"\s+", "", _clean(token)).replace(",", "").rstrip(".")
    try:
        value = float(token)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _boxed_contents(text: str) -> list[str]:
    """Contents of every \\boxed{...} / \\fbox{...}, with nested braces balanced."""
    out = []
    for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            out.append(text[m.end(): i - 1])
    return out


def _value_of(expr: str) -> float | None:
    """A boxed expression's value: a fraction, a/b, or its last number."""
    frac = _FRAC_RE.search(expr)
    if frac:
        num, den = to_number(frac.group(1)), to_number(frac.group(2))
        if num is not None and den:
            sign = -1 if re.search(r"-\s*\\[dt]?frac", expr) else 1
            return sign * float(Fraction(str(num)) / Fraction(str(den)))
    slash = _SLASH_RE.match(expr)
    if slash:
        num, den = to_number(slash.group(1)), to_number(slash.group(2))
        if num is not None and den:
            return num / den
    numbers = _NUMBER_RE.findall(expr)
    return to_number(numbers[-1]) if numbers else None


def extract_answer(response: str) -> float | None:
    """The response's final numeric answer, or None if it states no number."""
    text = _clean(response)
    for boxed in reversed(_boxed_contents(text)):
        value = _value_of(boxed)
        if value is not None:
            return value
    stated = _ANSWER_RE.findall(text)
    if stated:
        return to_number(stated[-1])
    numbers = _NUMBER_RE.findall(text)
    return to_number(numbers[-1]) if numbers else None


def same_number(a: float, b: float, tol: float = TOLERANCE) -> bool:
    return math.isclose(a, b, rel_tol=tol, abs_tol=tol)


def score_one(prompt: Prompt, response: str) -> Score:
    if prompt.reference is None or not str(prompt.reference).strip():
        return Score(None, ERROR, f"prompt {prompt.prompt_id} has no reference answer")
    gold = to_number(str(prompt.reference))
    if gold is None:  # a GSM8K-style reference that is not a number is a data error
        gold = extract_answer(str(prompt.reference))
    if gold is None:
        return Score(None, ERROR, f"prompt {prompt.prompt_id} reference is not a number: "
                                  f"{str(prompt.reference)[:80]!r}")
    got = extract_answer(response)
    return Score(1.0 if got is not None and same_number(got, gold) else 0.0, OK, None)


class MathReward:
    """`RewardBackend` for verifiable numeric answers; cheap, so it runs inline."""

    identity = IDENTITY

    async def score_batch(self, items: list[tuple[Prompt, str]]) -> list[Score]:
        # regexes over a batch take microseconds: a thread hop would cost more than it saves,
        # but a huge batch is still moved off the loop
        if len(items) > 256:
            return await asyncio.to_thread(lambda: [score_one(p, r) for p, r in items])
        return [score_one(p, r) for p, r in items]


__all__ = ["MathReward", "extract_answer", "to_number", "score_one", "IDENTITY"]
