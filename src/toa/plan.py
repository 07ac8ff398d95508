"""The run plan: the one owner of a run's identity and of its method instances.

`run_id(cfg)` is a pure function of the resolved config (blocks resolved, see
flows/synthesize.resolve). Its inputs:
- the config fields that change results (toa.config: fields not marked operational);
- every method's validated options (defaults filled in, so writing a default out changes
  nothing) and its `fingerprint()`;
- the code version: toa's version plus a hash of the sources that produce results
  (`RESULT_SOURCES`: methods, reward backends, templates, request shaping, prompt loading,
  row and dataset building), so a fix in a method gives a new run whose unchanged calls are
  replayed from the call record (calls are keyed by their request, not by run id).

Operational fields (concurrency, timeouts, retries, where results go, cores) stay out, so
changing them resumes the same run. `toa plan` prints the plan without starting anything.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import toa
from toa.config import RunConfig, load_config, place_servers
from toa.methods import Method
from toa.rows import content_key

# Paths under the toa package whose text decides what a run produces (files, or folders of .py/.txt).
RESULT_SOURCES = ("methods", "reward", "templates", "calls.py", "prompts.py", "rows.py", "datasets.py",
                  "optima_datasets.py", "dialogue.py")


@cache
def code_version(package: Path = Path(toa.__file__).parent) -> str:
    """`<toa version>+<hash of RESULT_SOURCES under package>`; computed once per process."""
    digest = hashlib.sha256()
    for path in _result_files(package):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return f"{toa.__version__}+{digest.hexdigest()[:12]}"


def _result_files(package: Path) -> Iterable[Path]:
    for name in RESULT_SOURCES:
        part = package / name
        files = [part] if part.is_file() else [*part.rglob("*.py"), *part.rglob("*.txt")]
        yield from sorted(files, key=lambda p: p.relative_to(package).as_posix())


def resolve(config_file: str | None, overrides: dict[str, Any]) -> RunConfig:
    """The run's config: file, environment and overrides, blocks resolved (before the
    fingerprint is taken), launched CPU servers placed on their cores."""
    cfg = load_config(config_file, {k: v for k, v in overrides.items() if v is not None})
    return place_servers(with_blocks(cfg))


def with_blocks(cfg: RunConfig) -> RunConfig:
    """`cfg` with the Prefect blocks it names resolved (imports Prefect only when it names one)."""
    if not (cfg.reward.block or cfg.results_block):
        return cfg
    from toa.blocks.resolve import resolve_blocks

    return resolve_blocks(cfg)


def run_id(cfg: RunConfig, code: str | None = None) -> str:
    """The run's identity (see the module docstring); `code` defaults to this toa's version."""
    own = {name: {"options": m.options.model_dump(mode="json"), **m.fingerprint()}
           for name, m in cfg.method_objects.items()}
    return content_key(cfg.fingerprint_fields(), own, code or code_version())[:16]


@dataclass(frozen=True)
class RunPlan:
    """A resolved config, its methods (built once) and its identity; what every task gets."""

    cfg: RunConfig
    methods: dict[str, Method] = field(repr=False)
    run_id: str


def plan_run(cfg: RunConfig) -> RunPlan:
    return RunPlan(cfg, cfg.method_objects, run_id(cfg))


def expected_generations(plan: RunPlan, method: str, prompts: int) -> str:
    """Generations a method makes for `prompts` prompts (its budget rule, docs/methods.md §0)."""
    per_prompt = plan.methods[method].generations(len(plan.cfg.agents), plan.cfg.n)
    return "an answer-dependent number of" if per_prompt is None else f"{per_prompt * prompts}"


def describe(plan: RunPlan, units: list[tuple[str, Any, Any]]) -> list[str]:
    """Lines for `toa plan` from (method, batch, its record or None when not finished) per unit."""
    lines = [(f"run {plan.run_id} (code {code_version()}): {len(plan.cfg.methods)} methods, "
              f"{len(plan.cfg.agents)} agents, n={plan.cfg.n}")]
    todo = [(m, b) for m, b, done in units if done is None]
    for method in plan.cfg.methods:
        mine = [(b, done) for m, b, done in units if m == method]
        pending = [b for b, done in mine if done is None]
        prompts = sum(b.size for b in pending)
        lines.append(f"  {method}: {len(mine) - len(pending)} of {len(mine)} batches done; "
                     f"{len(pending)} to run ({prompts} prompts, "
                     f"{expected_generations(plan, method, prompts)} generations)")
    lines.append("nothing to run: a rerun returns the recorded result" if not todo else
                 f"{len(todo)} (method, batch) units to run; calls already recorded are replayed, not made")
    return lines

