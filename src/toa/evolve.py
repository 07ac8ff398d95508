"""Prompt evolution (EVA, "Evolving Alignment via Asymmetric Self-Play", arXiv 2410.16714):
pick the prompts the policies are most informative on, rewrite them into new prompts, and mix
the new prompts with the old ones for the next round of sampling.

Plain Python, no Prefect (flows/evolve.py and tasks/evolve.py orchestrate it):
1. Informativeness per prompt from the rewards already sampled (`informativeness`; the SQL view
   `prompt_informativeness` in sql/evolve.sql computes the same numbers and is what the stage
   reads): mean, population variance, max-min gap, max-mean, best-minus-second. The released EVA
   selects on max-min (a prompt whose best and worst responses differ a lot still has something
   to teach).
2. Selection (`select_informative`): importance-weighted sampling without replacement
   (Efraimidis-Spirakis keys u^(1/w)), weights = the metric (shifted to be >= 0), a `fraction` of
   the prompts, seeded: the same rewards and seed select the same prompts.
3. Evolution (`evolve_prompts`): each selected prompt goes through a chain of `evolutions`
   rewrites, each with an Evol-Instruct-style instruction (src/toa/templates/evolve_*.txt:
   deepen, constraints, concretize, reasoning, breadth) drawn by a seeded RNG; a step rewrites
   the last kept prompt of its chain. Calls go through `generate` (in production the request
   layer, so they are recorded under content keys and a rerun replays them for free).
4. Cleaning and filters (`clean_rewrite`, `reject_reason`): labels, quotes, code fences and
   echoed instructions are removed; empty, too short or long, near copies of the parent,
   refusals, replies about the rewriting ("the rewritten prompt ...") and duplicates (normalised,
   case-folded text) are rejected, each with its reason in
   the `evolutions` table (errors and rejections are data).
5. References: a reference-based reward (the similarity default) needs one per prompt, so by
   default the evolving agent answers each kept prompt once (`reference = "generate"`).
6. Mixing (`mix`): all kept evolved prompts plus a seeded sample of the originals so that evolved
   prompts make `evolved_share` of the next set.
"""

from __future__ import annotations

import asyncio
import difflib
import json
import math
import random
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from toa import templates
from toa.prompts import normalize_text, prompt_id_for
from toa.rows import EvolutionRow, Generation, Prompt, content_key

METRICS = ("mean", "variance", "max_min", "max_mean", "best_minus_second")
KINDS = ("deepen", "constraints", "concretize", "reasoning", "breadth")
Metric = Literal["mean", "variance", "max_min", "max_mean", "best_minus_second"]
Kind = Literal["deepen", "constraints", "concretize", "reasoning", "breadth"]

KEPT, REJECTED, FAILED = "ok", "rejected", "error"  # evolutions.status


class EvolveConfig(BaseModel):
    """How prompts are selected, evolved and mixed. Every field changes results, so all of them
    (with the evolve templates' hashes) make the evolve id."""

    model_config = ConfigDict(extra="forbid")
    iterations: int = Field(1, ge=1, description="Evolve steps; the loop samples iterations + 1 prompt sets.")
    metric: Metric = Field("max_min", description="Informativeness used for selection (EVA's release: max_min).")
    fraction: float = Field(0.25, gt=0, le=1, description="Share of the current prompts selected for evolution.")
    min_selected: int = Field(1, ge=1, description="Select at least this many prompts (small sets).")
    evolutions: int = Field(4, ge=1, description="Rewrites per selected prompt (a chain: each rewrites the last kept one).")
    kinds: list[Kind] = Field(list(KINDS), min_length=1, description="Rewrite instructions drawn from (seeded).")
    agent: str | None = Field(None, description="Agent alias that rewrites prompts; default the first agent.")
    temperature: float = Field(1.0, ge=0, description="Sampling temperature of the rewrite calls.")
    max_tokens: int = Field(256, gt=0, description="Completion cap of a rewrite call.")
    reference: Literal["generate", "none"] = Field(
        "generate", description="'generate': the agent answers each kept prompt once and that answer is its "
                                "reference (reference-based rewards need one); 'none': no reference.")
    reference_max_tokens: int | None = Field(None, gt=0, description="Completion cap of a reference call (default: the agent's).")
    evolved_share: float = Field(0.5, gt=0, le=1, description="Share of evolved prompts in the next prompt set; "
                                                              "1.0 keeps only evolved prompts.")
    min_chars: int = Field(12, ge=1, description="Reject rewrites shorter than this (characters, normalised).")
    max_chars: int = Field(2000, gt=0, description="Reject rewrites longer than this.")
    max_similarity: float = Field(0.9, gt=0, le=1, description="Reject a rewrite this similar to its parent (difflib ratio).")
    seed: int = Field(0, description="Seed of selection, instruction draws, mixing and the rewrite calls.")

    def fingerprint(self) -> dict[str, Any]:
        return {**self.model_dump(), "templates": templates.hashes(templates.EVOLVE_NAMES)}


# --- 1. informativeness --------------------------------------------------------------------

def informativeness(rewards: Sequence[float]) -> dict[str, float]:
    """The five metrics of one prompt's scored rewards (population variance; gaps are 0 for a
    single reward). Must match sql/evolve.sql `prompt_informativeness`."""
    if not rewards:
        raise ValueError("informativeness needs at least one reward")
    xs = sorted(rewards, reverse=True)
    mean = sum(xs) / len(xs)
    return {
        "mean": mean,
        "variance": sum((x - mean) ** 2 for x in xs) / len(xs),
        "max_min": xs[0] - xs[-1],
        "max_mean": xs[0] - mean,
        "best_minus_second": xs[0] - xs[1] if len(xs) > 1 else 0.0,
    }


# --- 2. selection --------------------------------------------------------------------------

def select_informative(metric: dict[str, float], fraction: float, seed: int, min_selected: int = 1) -> list[str]:
    """Prompt ids drawn without replacement with probability proportional to the metric
    (Efraimidis-Spirakis: the largest u^(1/w)), round(fraction * N) of them (at least
    `min_selected`), in a deterministic order. Weights are shifted to be >= 0 (mean rewards may
    be negative) plus a small floor, so a zero-metric prompt is picked only when needed."""
    usable = {p: v for p, v in metric.items() if v is not None and math.isfinite(v)}
    if not usable:
        return []
    count = min(len(usable), max(min_selected, round(fraction * len(usable))))
    low = min(usable.values())
    shift = -low if low < 0 else 0.0
    rng = random.Random(int(content_key("select", seed)[:12], 16))
    keys = []
    for pid in sorted(usable):  # sorted: the draw must not depend on dict order
        w = usable[pid] + shift + 1e-9
        keys.append((rng.random() ** (1.0 / w), pid))
    return [pid for _, pid in sorted(keys, reverse=True)[:count]]


# --- 4. cleaning and filters ---------------------------------------------------------------

_LABEL = re.compile(r"^\s*(?:#+\s*)?(?:\*\*)?(?:new|rewritten|evolved|revised|improved|updated)?\s*"
                    r"(?:prompt|question|instruction|task)\s*(?:\d+)?\s*(?:\*\*)?\s*:\s*(?:\*\*)?\s*", re.IGNORECASE)
_STOP = re.compile(r"^\s*(?:#+\s*)?(?:\*\*)?(?:answer|response|solution|original prompt|explanation|note)\b.*$",
                   re.IGNORECASE | re.MULTILINE)
_REFUSAL = re.compile(r"^\s*(?:i'?m sorry|i am sorry|sorry\b|i cannot|i can'?t|i can not|i won'?t|i'?m unable|"
                      r"i am unable|as an ai\b|i'?m not able|i am not able)", re.IGNORECASE)
# a reply about the rewriting rather than a prompt ("Here is the rewritten prompt ...", "your
# original question ..."): small models often do this
_META = re.compile(r"\b(?:original (?:prompt|question|instruction|task)|rewritten (?:prompt|question|instruction|version)"
                   r"|(?:new|revised|evolved) (?:prompt|instruction)|your response meets)\b", re.IGNORECASE)
_QUOTES = "\"'`\u201c\u201d\u2018\u2019"


def clean_rewrite(text: str | None) -> str:
    """The new prompt inside a rewrite reply: code fences, a leading label ("New prompt:"),
    surrounding quotes, and anything from an answer or an echoed instruction header on are
    removed; blank-line runs collapse."""
    if not text:
        return ""
    text = re.sub(r"```[a-zA-Z]*", "", text).strip()
    text = _LABEL.sub("", text, count=1)
    stop = _STOP.search(text)
    if stop and stop.start() > 0:  # a reply that starts answering its own prompt: keep the prompt
        text = text[: stop.start()]
    text = re.sub(r"\n\s*\n\s*\n+", "\n\n", text).strip()
    if len(text) >= 2 and text[0] in _QUOTES and text[-1] in _QUOTES:
        text = text[1:-1].strip()
    return text


def dedup_key(text: str) -> str:
    """Two prompts are duplicates when their normalised, case-folded texts are equal."""
    return content_key(normalize_text(text).casefold())


def reject_reason(text: str, parent: str, cfg: EvolveConfig) -> str | None:
    """Why a cleaned rewrite is not a usable new prompt, or None when it is."""
    norm = normalize_text(text)
    if not norm:
        return "empty"
    if len(norm) < cfg.min_chars:
        return f"too short ({len(norm)} < {cfg.min_chars} characters)"
    if len(norm) > cfg.max_chars:
        return f"too long ({len(norm)} > {cfg.max_chars} characters)"
    if _REFUSAL.match(norm):
        return "refusal"
    if _META.search(norm):
        return "talks about the rewrite, not a prompt"
    parent_norm = normalize_text(parent)
    if norm.casefold() == parent_norm.casefold():
        return "copy of the parent"
    ratio = difflib.SequenceMatcher(None, norm.casefold(), parent_norm.casefold()).ratio()
    if ratio >= cfg.max_similarity:
        return f"near copy of the parent (similarity {ratio:.2f} >= {cfg.max_similarity})"
    return None


# --- 3. evolution --------------------------------------------------------------------------

Generate = Callable[..., Awaitable[list[Generation]]]  # (agent, messages, n, **sampling)


@dataclass
class Step:
    """One evolution step while the loop fills it in (it is mutated: a reference is added, a
    duplicate rejected); stored as an `evolutions` row (rows.EvolutionRow) with the loop's keys.
    Every field here is a column there: building the row from it fails on any mismatch."""

    prompt_id: str | None
    parent_prompt_id: str
    root_prompt_id: str
    step: int
    kind: str
    kinds: str  # the chain of kinds from the root to this prompt, "deepen>breadth"
    call_key: str | None
    text: str | None
    status: str
    reason: str | None = None
    reference: str | None = None
    reference_call_key: str | None = None
    parent_metric: float | None = None


@dataclass
class Evolution:
    steps: list[Step] = field(default_factory=list)
    prompts: list[Prompt] = field(default_factory=list)  # kept evolved prompts, chain order

    @property
    def failed(self) -> int:
        return sum(s.status == FAILED for s in self.steps)


def draw_kinds(cfg: EvolveConfig, prompt_id: str, iteration: int) -> list[str]:
    """The chain of rewrite instructions for one prompt: seeded by (seed, iteration, prompt)."""
    rng = random.Random(int(content_key("kinds", cfg.seed, iteration, prompt_id)[:12], 16))
    return [rng.choice(cfg.kinds) for _ in range(cfg.evolutions)]


def rewrite_messages(kind: str, prompt_text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": templates.load(f"evolve_{kind}").render(prompt=prompt_text)}]


async def evolve_chain(root: Prompt, kinds: list[str], generate: Generate, agent: str, cfg: EvolveConfig,
                       seen: set[str], metric: float | None = None) -> list[Step]:
    """Rewrite `root` len(kinds) times; each step rewrites the last kept prompt of the chain
    (a rejected or failed step leaves it where it was). `seen` holds the dedup keys of the
    current prompt set; the chain adds its own kept prompts (duplicates across chains are
    settled by the caller)."""
    steps: list[Step] = []
    current, chain = root, []
    for i, kind in enumerate(kinds, start=1):
        (g,) = await generate(agent, rewrite_messages(kind, current.text), 1,
                              temperature=cfg.temperature, max_tokens=cfg.max_tokens)
        label = ">".join([*chain, kind])
        base = dict(parent_prompt_id=current.prompt_id, root_prompt_id=root.prompt_id, step=i, kind=kind,
                    kinds=label, call_key=g.sample_id, parent_metric=metric)
        if not g.ok:
            steps.append(Step(prompt_id=None, text=None, status=FAILED, reason=g.error, **base))
            continue
        text = clean_rewrite(g.text)
        reason = reject_reason(text, current.text, cfg)
        if reason is None and dedup_key(text) in seen:
            reason = "duplicate"
        if reason is not None:
            steps.append(Step(prompt_id=None, text=text or g.text, status=REJECTED, reason=reason, **base))
            continue
        seen.add(dedup_key(text))
        new = Prompt(prompt_id=prompt_id_for(text), text=text, source="evolved")
        steps.append(Step(prompt_id=new.prompt_id, text=text, status=KEPT, **base))
        current, chain = new, [*chain, kind]
    return steps


async def add_references(steps: list[Step], generate_for: Callable[[str], Generate], agent: str,
                         cfg: EvolveConfig) -> None:
    """The agent's answer to each kept prompt becomes its reference; a failed call turns the
    step into an error (retried on the next run), never a prompt without its reference."""
    kept = [s for s in steps if s.status == KEPT]
    sampling = {"max_tokens": cfg.reference_max_tokens} if cfg.reference_max_tokens else {}

    async def one(s: Step) -> None:
        (g,) = await generate_for(s.prompt_id)(agent, [{"role": "user", "content": s.text}], 1, **sampling)
        s.reference_call_key = g.sample_id
        if g.ok and g.text and g.text.strip():
            s.reference = g.text.strip()
        else:
            s.status, s.reason = FAILED, f"reference call failed: {g.error or 'empty answer'}"

    await asyncio.gather(*(one(s) for s in kept))


async def evolve_prompts(selected: list[Prompt], current: list[Prompt], generate_for: Callable[[str], Generate],
                         agent: str, cfg: EvolveConfig, iteration: int,
                         metric: dict[str, float] | None = None) -> Evolution:
    """Evolve every selected prompt (chains run concurrently) and attach references.
    `generate_for(prompt_id)` gives the generate callable of that prompt (slot counting is per
    prompt, as in sampling). Dedup covers the whole current set and every kept rewrite; chains
    are run concurrently, and duplicates across chains are settled afterwards in selection order,
    so the outcome does not depend on which call returned first."""
    seen = {dedup_key(p.text) for p in current}
    chains = await asyncio.gather(*(
        evolve_chain(p, draw_kinds(cfg, p.prompt_id, iteration), generate_for(p.prompt_id), agent, cfg, set(seen),
                     (metric or {}).get(p.prompt_id))
        for p in selected))
    steps = [s for chain in chains for s in chain]
    for s in steps:  # duplicates across chains: the earlier chain (selection order) keeps it
        if s.status == KEPT:
            key = dedup_key(s.text)
            if key in seen:
                s.status, s.reason, s.prompt_id = REJECTED, "duplicate", None
            seen.add(key)
    if cfg.reference == "generate":
        await add_references(steps, generate_for, agent, cfg)
    prompts = [Prompt(prompt_id=s.prompt_id, text=s.text, reference=s.reference, source="evolved")
               for s in steps if s.status == KEPT]
    return Evolution(steps=steps, prompts=prompts)


# --- 6. mixing -----------------------------------------------------------------------------

def mix(originals: list[Prompt], evolved: list[Prompt], share: float, seed: int) -> list[Prompt]:
    """Every evolved prompt, plus originals drawn (seeded) so that evolved prompts make `share`
    of the result; all originals when there are too few. With no evolved prompt the originals
    come back unchanged (an empty next round would end the loop)."""
    if not evolved:
        return list(originals)
    want = len(originals) if share <= 0 else round(len(evolved) * (1 - share) / share)
    rng = random.Random(int(content_key("mix", seed)[:12], 16))
    kept = sorted(rng.sample(range(len(originals)), min(want, len(originals))))
    return [originals[i] for i in kept] + list(evolved)


# --- the stage: read a run's rewards, evolve, write the next prompt set --------------------

class EvolveFailed(RuntimeError):
    """Some rewrite or reference calls failed; they are rows in `evolutions` and `call_attempts`,
    and a rerun makes only those calls again."""


def evolve_id(base_run_id: str, cfg: EvolveConfig) -> str:
    """Names one evolve loop: the first run (its config and prompts) and the evolve settings."""
    return content_key("evolve", base_run_id, cfg.fingerprint())[:16]


def iteration_dir(eid: str, iteration: int) -> tuple[str, ...]:
    return ("evolve", f"evolve={eid}", f"iter={iteration}")


def step_key(eid: str, iteration: int, from_run_id: str) -> str:
    """Keys one evolve step: the loop, the iteration and the run whose rewards it reads."""
    return content_key(eid, iteration, from_run_id)[:16]


def step_done(store, eid: str, iteration: int, from_run_id: str) -> bool:
    """The step has written its prompt set for these rewards (a rerun needs no model)."""
    manifest = (*iteration_dir(eid, iteration), "manifest.json")
    return store.exists(*manifest) and store.read_json(*manifest).get("key") == step_key(eid, iteration, from_run_id)


def store_url(store, *parts: str) -> str:
    """A URL the prompt loader can open for a path in the results root (remote roots keep
    their protocol)."""
    path = store.path(*parts)
    if store.local:
        return path
    protocol = store.fs.protocol if isinstance(store.fs.protocol, str) else store.fs.protocol[0]
    return f"{protocol}://{path}"


def run_step(run_cfg, cfg: EvolveConfig, eid: str, iteration: int, from_run_id: str, prompt_source: str,
             endpoints: dict | None) -> dict[str, Any]:
    """One evolve step after run `from_run_id` sampled the prompts of `prompt_source`: select,
    evolve, filter, mix; writes `evolutions` rows and the next prompt set (JSONL) and returns its
    manifest. A finished step (manifest present) returns at once: no endpoint is needed, no call
    is made. `endpoints` must hold the evolving agent when the step is not finished."""
    from toa.db import query
    from toa.sql import query_text
    from toa.storage import Store

    store = Store(run_cfg.results_root, run_cfg.storage_options)
    key = step_key(eid, iteration, from_run_id)
    manifest = (*iteration_dir(eid, iteration), "manifest.json")
    if step_done(store, eid, iteration, from_run_id):
        return {**store.read_json(*manifest), "calls_made": 0}
    agent = cfg.agent or run_cfg.agents[0].alias
    current = _read_prompts(store, prompt_source)
    scores = query(store, query_text("prompt_informativeness_of_run"), [from_run_id])  # every metric: pick one here
    metric = dict(zip(scores["prompt_id"], scores[cfg.metric]))
    metric = {p.prompt_id: metric[p.prompt_id] for p in current if p.prompt_id in metric}
    chosen = set(select_informative(metric, cfg.fraction, cfg.seed + iteration, cfg.min_selected))
    selected = [p for p in current if p.prompt_id in chosen]
    evo, made = _evolve_with_layer(store, run_cfg, cfg, key, agent, endpoints, selected, current, iteration, metric)
    rows = [EvolutionRow(**vars(s), evolve_id=eid, iteration=iteration, from_run_id=from_run_id, agent=agent,
                         metric=cfg.metric) for s in evo.steps]
    store.write_rows("evolutions", rows, f"evolve={eid}", f"iter={iteration}.parquet")
    if evo.failed:
        raise EvolveFailed(f"evolve iteration {iteration}: {evo.failed} failed calls (see the evolutions view)")
    mixed = mix(current, evo.prompts, cfg.evolved_share, cfg.seed + iteration)
    lines = [json.dumps({"id": p.prompt_id, "prompt": p.text, "reference": p.reference}, ensure_ascii=False)
             for p in mixed]
    store.write_bytes(("\n".join(lines) + "\n").encode("utf-8"), *iteration_dir(eid, iteration), "prompts.jsonl")
    out = {"key": key, "path": store_url(store, *iteration_dir(eid, iteration), "prompts.jsonl"),
           "prompts": len(mixed), "evolved": len(evo.prompts), "selected": len(selected),
           "steps": len(evo.steps), "rejected": sum(s.status == REJECTED for s in evo.steps)}
    store.write_json(out, *manifest)
    return {**out, "calls_made": made}


def _read_prompts(store, source: str) -> list[Prompt]:
    df = store.read("prompts", f"source={source}").sort("line")
    return [Prompt(**{k: r[k] for k in ("prompt_id", "text", "reference", "source", "line")})
            for r in df.iter_rows(named=True)]


def _evolve_with_layer(store, run_cfg, cfg, key, agent, endpoints, selected, current, iteration, metric):
    """Run the evolution on the request layer: calls recorded under calls/batch=evolve-<key>,
    replayed from there on a rerun."""
    from toa.calls import CallLayer
    from toa.engine import calls_cache, make_client
    from toa.storage import ShardWriter

    if not selected:
        return Evolution(), 0
    agent_cfg = next((a for a in run_cfg.agents if a.alias == agent), None)
    if agent_cfg is None or agent not in (endpoints or {}):
        raise ValueError(f"evolve agent {agent!r} is not a configured agent with a running endpoint "
                         f"(agents: {[a.alias for a in run_cfg.agents]})")
    batch = f"evolve-{key}"
    sink = ShardWriter(store, "calls", f"batch={batch}")

    async def go():
        client = await make_client(agent_cfg, endpoints[agent])  # the agent's limits hold here too
        layer = CallLayer({agent: client}, calls_cache(store, batch), sink.append, cfg.seed, namespace="evolve")
        try:
            evo = await evolve_prompts(selected, current, layer.for_prompt, agent, cfg, iteration, metric)
        finally:
            await client.aclose()
        return evo, sum(layer.made.values())

    try:
        return asyncio.run(go())
    finally:
        sink.flush()


__all__ = [
    "FAILED",
    "KEPT",
    "KINDS",
    "METRICS",
    "REJECTED",
    "Evolution",
    "EvolveConfig",
    "EvolveFailed",
    "Step",
    "add_references",
    "clean_rewrite",
    "dedup_key",
    "draw_kinds",
    "evolve_chain",
    "evolve_id",
    "evolve_prompts",
    "informativeness",
    "iteration_dir",
    "mix",
    "reject_reason",
    "rewrite_messages",
    "run_step",
    "select_informative",
    "step_done",
    "step_key",
]
