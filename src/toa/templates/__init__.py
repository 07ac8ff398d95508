"""Prompt templates of the sampling methods (docs/methods.md §6), kept as versioned files.

The TOA reference (oceanypt/TOA, arXiv 2412.17061) never published its refine and aggregator
prompts, so the wording here is this project's own. Each file starts with `#: key: value`
header lines (template name, version, fields, optional fields, a note); they are metadata and
never reach a model. The body is filled with `str.format`, so literal braces in a body must be
doubled. Bodies put the stable instructions first and the variable part (the answer, the
responses) last, so that a server's prefix cache can share the instructions across calls.

`sha` is the sha256 of the whole file (first 16 hex): it changes with any edit, header included,
and goes into the run record (`hashes()`) and the request cache key, so that changing a
template is visibly a different run.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cache
from importlib import resources

NAMES = ("refine", "aggregate", "feedback", "preference")
# Prompt-evolution templates (toa.evolve): hashed into the evolve stage's keys.
EVOLVE_NAMES = ("evolve_deepen", "evolve_constraints", "evolve_concretize", "evolve_reasoning", "evolve_breadth")
_HEADER = "#:"


@dataclass(frozen=True)
class Template:
    name: str
    text: str  # the body, header lines removed, trailing whitespace stripped
    sha: str  # sha256 of the file content, first 16 hex
    version: str
    fields: tuple[str, ...]  # must be given to render()
    optional: tuple[str, ...] = ()  # render() fills these with "" when not given

    def render(self, **kw: str) -> str:
        """Fill the body; a missing required field or an unknown one is an error, not a blank."""
        missing = [f for f in self.fields if f not in kw]
        unknown = [k for k in kw if k not in self.fields and k not in self.optional]
        if missing or unknown:
            raise KeyError(f"template {self.name!r}: missing {missing}, unknown {unknown}")
        return self.text.format(**{**{f: "" for f in self.optional}, **kw})


def parse(name: str, content: str) -> Template:
    """A Template from a file's content (exposed for tests and for custom template files)."""
    lines = content.splitlines()
    meta: dict[str, str] = {}
    while lines and lines[0].startswith(_HEADER):
        key, _, value = lines.pop(0)[len(_HEADER):].partition(":")
        meta[key.strip()] = value.strip()
    return Template(
        name=name,
        text="\n".join(lines).rstrip(),
        sha=hashlib.sha256(content.encode("utf-8")).hexdigest()[:16],
        version=meta.get("version", "0"),
        fields=_names(meta.get("fields", "")),
        optional=_names(meta.get("optional", "")),
    )


def _names(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


@cache
def load(name: str) -> Template:
    """The packaged template `name` (one of NAMES or EVOLVE_NAMES). Cached: files are read once per process."""
    if name not in NAMES + EVOLVE_NAMES:
        raise KeyError(f"unknown template {name!r}; known: {', '.join(NAMES + EVOLVE_NAMES)}")
    content = resources.files(__package__).joinpath(f"{name}.txt").read_text(encoding="utf-8")
    return parse(name, content)


def hashes(names: tuple[str, ...] = NAMES) -> dict[str, str]:
    """{template name: sha} for the packaged sampling templates (or `names`), for the run record."""
    return {name: load(name).sha for name in names}


__all__ = ["EVOLVE_NAMES", "NAMES", "Template", "hashes", "load", "parse"]
