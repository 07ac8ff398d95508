"""Verifiable reward for GSM8K- and MATH-style prompts: 1.0 when the response's final answer
equals the gold answer in `prompt.reference`, else 0.0.

Why this exists: on a CPU box no reward model ships in a package and a 135M judge carries no
signal (docs/design.md §6), so prompts with known answers give the default run a reward that is both
real and meaningful.

Extraction order (the last match of the first rule that matches wins, since models restate
intermediate numbers before the final one):
1. \\boxed{...} (balanced braces; \\frac{a}{b} and a/b inside are evaluated),
2. "answer is X", "answer: X", "#### X",
3. else the LAST number in the text.
Normalisation: unicode minus, "$", "\\$", "%", "\\%", "^\\circ", thousands separators ("1,234",
"1{,}234", "1\\,234"), LaTeX spacing ("\\,", "\\!", "\\;") and trailing ".0" are dropped.
Values: a boxed answer or a reference is evaluated as a small numeric LaTeX expression first:
\\frac / \\dfrac / \\tfrac (nested braces, "\\frac12"), \\sqrt{n}, \\sqrt[k]{n}, \\pi, \\cdot,
\\times, ^, implicit products ("2\\sqrt{3}"), "a/b", and "x = 5" (the right-hand side), by a
whitelisting AST evaluator (never eval). So "3/4", "\\frac{3}{4}" and "0.75" are equal.
Comparison is numeric with absolute tolerance 1e-6 (relative for large numbers).
Symbolic MATH answers ("(3, -1)", "\\text{(C)}", "x^2+1"): when the reference is LaTeX-like (has
a backslash, ^, braces, brackets, parentheses or "=") and not numeric, the last \\boxed{} answer
is compared with it as a normalised string (spacing, \\left/\\right, \\text{}, "$" removed).

A response with no number (or, for a symbolic reference, no \\boxed{}) scores 0.0: it is a
wrong answer, which is a real reward. A prompt with no reference (or a reference that is neither
a number nor LaTeX-like) is an error Score: there is nothing to compare to, and that must never
look like a wrong answer.
"""

from __future__ import annotations

import ast
import asyncio
import math
import operator
import re
from fractions import Fraction

from toa.rows import ERROR, OK, Prompt, Score

IDENTITY = "math_verify:v2"  # bump on any change to extraction or comparison: it keys the cache
TOLERANCE = 1e-6

# a sign only where it cannot be a subtraction or range dash ("3-4" is 3 and 4, not -4)
_NUMBER = r"(?:(?<![\w)\]}])-\s*)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|(?:(?<![\w)\]}])-)?\.\d+"
_NUMBER_RE = re.compile(_NUMBER)
_FRAC_RE = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_SLASH_RE = re.compile(rf"^\s*({_NUMBER})\s*/\s*({_NUMBER})\s*$")
_STATED_FRAC = r"-?\s*\\[dt]?frac\s*\{[^{}]*\}\s*\{[^{}]*\}|(?:-\s*)?\d+\s*/\s*\d+(?![\d.,])"
_ANSWER_RE = re.compile(
    rf"(?:answer\s*(?:is|:|=)|####)\s*(?:[a-z\s]{{0,12}}?[:=]?\s*)?({_STATED_FRAC}|{_NUMBER})",
    re.IGNORECASE,
)
# a reference that is not a number but looks like LaTeX / math: compared as a string
_SYMBOLIC_RE = re.compile(r"[\\^{}()\[\]=]")
_MAX_SYMBOLIC_LEN = 120  # longer non-numeric references are prose (a GSM8K solution), not answers


def clean(text: str) -> str:
    """Unify the spellings models use for the same number."""
    text = text.replace("\\$", "").replace("\\%", "").replace("^\\circ", "").replace("^{\\circ}", "")
    text = text.replace("\u2212", "-").replace("\u2013", "-").replace("$", "").replace("%", "")
    text = text.replace("\\!", "").replace("{,}", ",").replace("\\,", "")  # LaTeX spacing / commas
    text = text.replace("\\;", " ").replace("\\ ", " ")
    return text


def to_number(token: str) -> float | None:
    """'1,234' -> 1234.0, '-3.50' -> -3.5; None if not a number."""
    token = re.sub(r"\s+", "", clean(token)).replace(",", "").rstrip(".")
    try:
        value = float(token)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


# ---- numeric LaTeX expressions -----------------------------------------------------------------
_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.Div: operator.truediv, ast.Pow: operator.pow}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}
_NAMES = {"pi": math.pi}


def _group(s: str, i: int) -> tuple[str, int]:
    """The balanced {...} group starting at s[i] (spaces skipped), or one bare character
    ("\\frac12"); returns (content, index after it)."""
    while i < len(s) and s[i] == " ":
        i += 1
    if i >= len(s):
        raise ValueError("missing argument")
    if s[i] != "{":
        return s[i], i + 1
    depth, j = 1, i + 1
    while j < len(s) and depth:
        depth += {"{": 1, "}": -1}.get(s[j], 0)
        j += 1
    if depth:
        raise ValueError("unbalanced braces")
    return s[i + 1: j - 1], j


def _expand(s: str) -> str:
    """\\frac{a}{b} -> ((a)/(b)), \\sqrt{a} -> sqrt(a), \\sqrt[k]{a} -> ((a)**(1/(k))),
    recursively (arguments may nest)."""
    out, i = [], 0
    while i < len(s):
        if s.startswith("\\frac", i):
            a, j = _group(s, i + 5)
            b, i = _group(s, j)
            out.append(f"(({_expand(a)})/({_expand(b)}))")
        elif s.startswith("\\sqrt", i):
            j, root = i + 5, None
            if s[j: j + 1] == "[":
                close = s.index("]", j)
                root, j = s[j + 1: close], close + 1
            a, i = _group(s, j)
            out.append(f"sqrt({_expand(a)})" if root is None
                       else f"(({_expand(a)})**(1/({_expand(root)})))")
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


def _to_python(expr: str) -> str:
    s = re.sub(r"\\(?:left|right|displaystyle)", "", expr)
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    s = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", s)  # thousands separators
    for tex, py in (("\\cdot", "*"), ("\\times", "*"), ("\\div", "/"), ("\\pi", "(pi)")):
        s = s.replace(tex, py)
    s = _expand(s).replace("^", "**").replace("{", "(").replace("}", ")")
    if "\\" in s:
        raise ValueError("unsupported LaTeX")
    return re.sub(r"(?<=[\d)])\s*(?=[(a-z])", "*", s)  # implicit product: 2sqrt(3), 2(pi)


def _eval(node: ast.AST) -> float:
    """Whitelisted arithmetic only: numbers, pi, + - * / **, sqrt()."""
    if isinstance(node, ast.Expression):
        return _eval(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return float(node.value)
    if isinstance(node, ast.Name) and node.id in _NAMES:
        return _NAMES[node.id]
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_eval(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        # operands are floats, so even 9**9**9 costs O(1): it overflows instead of looping
        left, right = _eval(node.left), _eval(node.right)
        return _BINOPS[type(node.op)](left, right)
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "sqrt"
            and len(node.args) == 1 and not node.keywords):
        return math.sqrt(_eval(node.args[0]))
    raise ValueError(f"not arithmetic: {type(node).__name__}")


def parse_value(expr: str) -> float | None:
    """The value of a numeric answer expression ("\\frac{\\sqrt{3}}{2}", "3/4", "x = 5",
    "2\\sqrt{3}", "1{,}234"), or None when it is not plain arithmetic."""
    s = re.sub(r"\\(?:text|mbox|mathrm)\s*\{[^{}]*\}", "", clean(expr)).strip().rstrip(".")
    if "=" in s:  # "x = 5": the value is the right-hand side
        s = s.rsplit("=", 1)[1]
    if not s.strip() or len(s) > 200:
        return None
    try:
        value = _eval(ast.parse(_to_python(s).strip(), mode="eval"))
    except (ValueError, SyntaxError, TypeError, ZeroDivisionError, OverflowError, RecursionError):
        return None
    return value if isinstance(value, float) and math.isfinite(value) else None


def normalize_symbolic(answer: str) -> str:
    """A symbolic answer as a comparable string: no spacing, \\left/\\right, \\text{} wrappers,
    "$", dfrac/tfrac spellings, or trailing period."""
    s = clean(answer)
    s = re.sub(r"\\(?:text|textbf|mathrm|mbox)\s*\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"\\(?:left|right|displaystyle)", "", s)
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    return re.sub(r"\s+", "", s).rstrip(".")


def boxed_contents(text: str) -> list[str]:
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
    """A boxed expression's value: the expression evaluated, else a fraction, a/b, or its
    last number."""
    value = parse_value(expr)
    if value is not None:
        return value
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
    text = clean(response)
    for boxed in reversed(boxed_contents(text)):
        value = _value_of(boxed)
        if value is not None:
            return value
    stated = _ANSWER_RE.findall(text)
    if stated:
        value = parse_value(stated[-1])
        return value if value is not None else to_number(stated[-1])
    numbers = _NUMBER_RE.findall(text)
    return to_number(numbers[-1]) if numbers else None


def same_number(a: float, b: float, tol: float = TOLERANCE) -> bool:
    return math.isclose(a, b, rel_tol=tol, abs_tol=tol)


def score_one(prompt: Prompt, response: str) -> Score:
    if prompt.reference is None or not str(prompt.reference).strip():
        return Score(None, ERROR, f"prompt {prompt.prompt_id} has no reference answer")
    reference = str(prompt.reference)
    gold = gold_value(reference)
    if gold is None and is_symbolic(reference):
        boxed = boxed_contents(clean(response))
        same = bool(boxed) and normalize_symbolic(boxed[-1]) == normalize_symbolic(reference)
        return Score(1.0 if same else 0.0, OK, None)
    if gold is None:
        return Score(None, ERROR, f"prompt {prompt.prompt_id} reference is not a number: "
                                  f"{reference[:80]!r}")
    got = extract_answer(response)
    return Score(1.0 if got is not None and same_number(got, gold) else 0.0, OK, None)


def gold_value(reference: str) -> float | None:
    """A number ("1,234"), a numeric expression ("\\frac{3}{4}", "3/4"), or the final answer of
    a GSM8K-style solution ("... #### 72"); None for a symbolic or unusable reference."""
    value = to_number(reference)
    if value is None:
        value = parse_value(reference)
    if value is None and ("####" in reference or not is_symbolic(reference)):
        value = extract_answer(reference)
    return value


def is_symbolic(reference: str) -> bool:
    """A short LaTeX-like answer ("(3, -1)", "\\text{(C)}", "x^2+1") rather than prose."""
    return ("####" not in reference and len(reference) <= _MAX_SYMBOLIC_LEN
            and bool(_SYMBOLIC_RE.search(reference)))


class MathReward:
    """`RewardBackend` for verifiable numeric answers; cheap, so it runs inline."""

    identity = IDENTITY

    async def score_batch(self, items: list[tuple[Prompt, str]]) -> list[Score]:
        # regexes over a batch take microseconds: a thread hop would cost more than it saves,
        # but a huge batch is still moved off the loop
        if len(items) > 256:
            return await asyncio.to_thread(lambda: [score_one(p, r) for p, r in items])
        return [score_one(p, r) for p, r in items]


__all__ = ["MathReward", "extract_answer", "to_number", "parse_value", "gold_value", "score_one",
           "IDENTITY"]
