"""Who sees what in a two-speaker dialogue (docs/methods.md §8): each speaker's instructions,
its share of the prompt (information-split mode), and its chat view of the dialogue so far.
Shared by the optima method (toa.methods.optima), which asks the speakers, and its dataset
builder (toa.optima_datasets), which rebuilds the same views for SFT and DPO rows.
"""

from __future__ import annotations

import math
import re
from functools import cache
from importlib import resources

from toa.templates import Template, parse

TEMPLATES = ("optima_solver", "optima_critic", "optima_split")
ROLES = {"critic": ("solver", "critic"), "split": ("a", "b")}
_SENTENCE = re.compile(r"(?<=[.!?])\s+")
NO_REPLY = "(no reply)"


@cache
def template(name: str) -> Template:
    """One of the dialogue's packaged templates (their text enters the run id with the code
    version, toa.plan)."""
    if name not in TEMPLATES:
        raise KeyError(f"unknown optima template {name!r}; known: {', '.join(TEMPLATES)}")
    return parse(name, resources.files("toa.templates").joinpath(f"{name}.txt").read_text(encoding="utf-8"))


# ------------------------------------------------------------------------------ who sees what
def split_context(text: str) -> tuple[str, str, str]:
    """(question, first half, second half) of a prompt for the information-split mode."""
    sentences = [s for s in _SENTENCE.split(text.strip()) if s]
    question = ""
    if len(sentences) >= 2 and sentences[-1].rstrip().endswith("?"):
        question = sentences.pop()
    half = math.ceil(len(sentences) / 2)
    return question, " ".join(sentences[:half]), " ".join(sentences[half:])


def intro(prompt_text: str, mode: str, speaker: int) -> str:
    """The first user message of `speaker` (0 or 1): its role's instructions and what it sees."""
    if mode == "critic":
        return template(("optima_solver", "optima_critic")[speaker]).render(question=prompt_text)
    question, first, second = split_context(prompt_text)
    info = (first, second)[speaker] or "(you have no extra information)"
    return template("optima_split").render(question=question or "Answer the task described by the combined information.",
                                           info=info)


def view(prompt_text: str, mode: str, speaker: int, turns: list[tuple[int, str]]) -> list[dict[str, str]]:
    """`speaker`'s chat messages given the dialogue so far [(speaker, text), ...]: own turns as
    assistant, the partner's as user; roles strictly alternate (the partner's first utterance
    is appended to the intro message when the partner spoke first)."""
    messages = [{"role": "user", "content": intro(prompt_text, mode, speaker)}]
    for who, text in turns:
        role = "assistant" if who == speaker else "user"
        text = text or NO_REPLY
        if role == "user" and messages[-1]["role"] == "user":
            messages[-1] = {"role": "user", "content": messages[-1]["content"] + "\n\n" + text}
        else:
            messages.append({"role": role, "content": text})
    return messages
