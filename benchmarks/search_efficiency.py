"""The TOA paper's efficiency claim, measured: how many generations each sampling method needs
to reach the mean best reward of Random best-of-32, and its mean best reward at 32 generations
(arXiv 2412.17061: TOA reaches Random's reward with far fewer generations when agents differ).

    python benchmarks/search_efficiency.py [--world differing|no_refine|both] [--prompts 200]
                                           [--seed 0] [--boot 2000] [--refine-scale 1.0]
    python benchmarks/search_efficiency.py --real [--real-prompts 64] [--real-root DIR] [--real-ns 16,8]

Every method runs through its real code (toa.methods.get_method: every registered method) in
process, on a simulated world of M = 4 agents. A method whose budget is not fixed in advance
(`generations()` is None: optima, step_mcts) or that fails on this world is skipped with its
reason. Budgets follow docs/methods.md §0.2: n per agent, n * M generations per prompt.

The simulated world
-------------------
Quality is on a reward scale like ArmoRM's (rewards around 0.1), the scale the paper's TOA
defaults (tau 0.1, alpha 0.01; docs/methods.md §5.9) were set for, so TOA runs with its
defaults. For prompt p (seeded by the world seed and the prompt id):

- difficulty d_p ~ N(0, 0.03), shared by all agents (it cancels out of every comparison);
- per agent a, a skill offset s_pa ~ N(0, skill_sd_a): which agent is best varies from prompt
  to prompt, which is what sampling several agents exploits;
- a fresh answer (no earlier response in the request) of agent a has quality
  q ~ N(d_p + mean_a + s_pa, spread_a);
- a refinement (a request whose messages hold an earlier response's tag: the refine template,
  MoA's aggregation, ...) starts from q0, the best tagged quality in the request, and closes a
  share u ~ N(closes_a, refine_sd_a) of the gap to the ceiling c_p = d_p + 0.20:
  q = q0 + u * max(0, c_p - q0). Gain and noise shrink together as answers near the ceiling
  (diminishing returns); u < 0, a refinement worse than its parent, happens too. Taking the
  best of several aggregated responses as q0 is generous to aggregation (MoA, Self-MoA).
- PRS feedback (a request made from the feedback template) is advice, not an answer: its
  reply carries no tag, so the refinement after it builds on y* alone; the world does not
  model what feedback is worth (prs_feedback is prs plus one generation here).

    agent  mean   spread  skill_sd  closes  refine_sd
    A      0.100  0.020   0.020     0.10    0.10      strongest on average: Random's agent
    B      0.090  0.025   0.025     0.20    0.12      the best refiner
    C      0.080  0.030   0.030     0.10    0.12
    D      0.060  0.035   0.030     0.05    0.15      weak, high variance

Worlds: `differing` is the above; `no_refine` has the same agents, but a refinement is a
fresh answer of the refining agent (its parent's quality is ignored): refining never helps.
`--refine-scale s` multiplies every `closes` (0: a refinement gains nothing in expectation,
only its noise remains), to see how much a result rests on the refinement gains.

Why these values: moderate, not tuned to a result. One refinement of an average answer of A
by the best refiner gains 0.20 * 0.10 = 0.020 (sd 0.012): less than best-of-8 of A gains
over one sample (0.020 * 1.42 = 0.028), half what best-of-32 gains (0.020 * 2.07 = 0.041).
The first agent is the strongest on average, so Random best-of-N is the strongest
single-agent baseline. (A first version let a refinement's noise stay constant up to and past
the ceiling, which rewards hill-climbing without bound; it was replaced by the gap-relative
rule above, which is less favourable to the refining methods, TOA among them.)

Each generated text carries its quality as a hidden tag, `[[q=0.123456]]`, which the simulated
reward reads back exactly. generate is content-addressed like the request layer
(docs/methods.md §0.5): the same agent and messages (and sampling overrides) asked again give
the next slot, and each draw uses a random.Random seeded from (world seed, prompt, agent,
messages, overrides, slot). So results never depend on scheduling order, equal requests of two
methods get the same answers (common random numbers: paired comparisons), and a smaller
budget's draws are a prefix of a larger one's.

Measured
--------
Budgets n = 1, 2, 3, 4, 6, 8 per agent (4..32 generations), then n = 12, 16, 24 for a method
that has not reached the target by 32, or whose bootstrap CI has not. TOA's default width
W = floor(M n / 3) is refused for n < 3 (W < M, docs/methods.md §5.4); there it runs with
width = M, the fix its own error names. Generations to target: the first budget whose mean
best reward reaches Random best-of-32's, linearly interpolated from the budget before, with a
95 % percentile bootstrap CI over prompts (the target recomputed on each resample: paired);
"<=" marks a method already there at its smallest budget, ">" one that never got there.
Best reward at 32 generations (33 for prs_feedback): the mean over prompts with its bootstrap
CI; then toa minus each method, per prompt, with a paired bootstrap CI. In no_refine the
paired CI of toa - parallel_ensemble says whether TOA is worse beyond the noise.

--real runs the same comparison on the embedded default (the two small models on vLLM, the
default reward; README "The embedded default") through the `toa` flow, M = 2 so n = 2..16,
on the AlpacaEval instructions with their reference outputs (../shared/data) when present,
else on the packaged prompt set (16 prompts); one flow call per budget into one results root
(content-addressed calls are shared across budgets, as in the simulation), best rewards from
the `prompts_best` view. The equal budget (n = 16) runs first, then n = 8, 4, 2, 12, 6 (most of
the curve first; a smaller budget finds its requests' first slots recorded by a larger one);
the tables are printed after each budget.
The root (--real-root, kept) makes the command resumable: run it again after a stop and it
goes on where it was. It needs `toa setup`'s vLLM environment; run_all runs it only when asked
(`--only search_efficiency_real`).

The last line (world differing):
    toa reaches random best-of-32 reward with <p>% of the generations

Findings (seed 0, 200 prompts; 2 shared cores at load ~4: --world differing 31 s wall, 19 s
CPU; both worlds 45 s wall):
- differing: toa needs 25 % of Random's generations (8.1 of 32, CI 7.4-9.0) and has the
  highest best reward at 32 (+0.034 over Random; ahead of every method, paired CIs above 0);
  moa is as fast (25 %, +0.030: it profits from the generous max-of-aggregated rule),
  sequential_refine 30 %, prs 34 %, parallel_ensemble 40 %, ab_mcts 42 %, self_moa 48 %.
- Most of the gap to Random comes from the agents differing, not from the search:
  parallel_ensemble, with no refinement at all, already needs only 40 %. With the refinement
  gains halved (--refine-scale 0.5) toa needs 32 %; with none (0) 42 %, next to
  parallel_ensemble's 40 %, still ahead of it at 32 generations (+0.020 vs +0.010 over Random).
- no_refine: toa is not worse than parallel_ensemble; it is slightly better beyond the noise
  (+0.0047, paired CI +0.0026..+0.0067), because its UCB steers the plays to the agent that is
  best on each prompt, and a refinement there is a fresh answer of that agent.

Findings of --real (64 AlpacaEval prompts, the embedded default; benchmarks/RESULTS.md): the
claim does not hold at this model scale. Random best-of-32 from SmolLM2 is beaten by no method
beyond the noise, TOA ends 0.020 below it at 32 generations, because a refinement by these
small models is usually worse than its parent (TOA's: -0.19 on average, better 15 % of the
time), unlike the world above, where refinements close part of the gap to the ceiling.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import re
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from importlib import import_module
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))  # run_all (cpu_line), throughput (prompts, for --real)

from run_all import cpu_line

from toa.methods import MethodContext, get_method, method_names
from toa.rows import ERROR, Generation, Message, Prompt, Score, content_key
from toa.templates import load

M = 4  # simulated agents
EQUAL_N = 8  # equal budget: M x 8 = 32 generations
BUDGET_NS = (1, 2, 3, 4, 6, 8)
EXTRA_NS = (12, 16, 24)  # for methods still short of the target at 32 generations
BASELINE = "random"
REAL_GENS = (32, 16, 8, 4, 24, 12)  # --real's order: the equal budget, halvings, then between (most of the curve first)
TAG = re.compile(r"\[\[q=(-?\d+\.\d+)\]\]")
FEEDBACK_MARK = load("feedback").text.splitlines()[0]  # the feedback template's fixed first line


# ---------------------------------------------------------------------------- the world
@dataclass(frozen=True)
class Agent:
    name: str
    mean: float  # mean quality of a fresh answer over prompts
    spread: float  # sd of its fresh answers to one prompt
    skill_sd: float  # sd of its per-prompt skill offset (which agent is best varies by prompt)
    closes: float  # share of the gap to the ceiling one refinement closes, in expectation
    refine_sd: float  # sd of that share


@dataclass(frozen=True)
class World:
    name: str
    agents: tuple[Agent, ...]
    refine_helps: bool
    seed: int = 0
    difficulty_sd: float = 0.03
    ceiling: float = 0.20  # best reachable quality above a prompt's difficulty
    refine_scale: float = 1.0  # multiplies every agent's `closes` (--refine-scale: sensitivity)

    def agent(self, name: str) -> Agent:
        return next(a for a in self.agents if a.name == name)

    def prompt_state(self, prompt_id: str) -> tuple[float, dict[str, float]]:
        """(difficulty, {agent: skill offset}) of a prompt: seeded by world seed and prompt id."""
        rng = random.Random(content_key("prompt", self.seed, prompt_id))
        difficulty = rng.gauss(0, self.difficulty_sd)
        return difficulty, {a.name: rng.gauss(0, a.skill_sd) for a in self.agents}

    def quality(self, prompt_id: str, agent: str, messages: list[Message], overrides: dict, slot: int) -> float:
        """The quality of slot `slot` of this request (see the module docstring)."""
        z = random.Random(content_key("draw", self.seed, prompt_id, agent, messages, overrides, slot)).gauss(0, 1)
        difficulty, skill = self.prompt_state(prompt_id)
        a = self.agent(agent)
        tags = [float(t) for m in messages for t in TAG.findall(m["content"])]
        if not tags or not self.refine_helps:  # a fresh answer (no_refine: refinements too)
            return difficulty + a.mean + skill[agent] + a.spread * z
        q0 = max(tags)
        gap = max(0.0, difficulty + self.ceiling - q0)
        # the share of the gap closed, u ~ N(closes, refine_sd): gain and noise shrink together
        # as the answer nears the ceiling (diminishing returns); u < 0 is a worse refinement
        return q0 + gap * (self.refine_scale * a.closes + a.refine_sd * z)


AGENTS = (
    Agent("A", 0.100, 0.020, 0.020, 0.10, 0.10),
    Agent("B", 0.090, 0.025, 0.025, 0.20, 0.12),
    Agent("C", 0.080, 0.030, 0.030, 0.10, 0.12),
    Agent("D", 0.060, 0.035, 0.030, 0.05, 0.15),
)
WORLDS = {"differing": World("differing", AGENTS, refine_helps=True),
          "no_refine": World("no_refine", AGENTS, refine_helps=False)}


class SimulatedGenerate:
    """The world's `generate` for one prompt and one method run: content-addressed slots as
    the request layer makes them (docs/methods.md §0.5), one tagged text per slot."""

    def __init__(self, world: World, prompt: Prompt):
        self.world, self.prompt = world, prompt
        self.slots: dict[str, int] = {}
        self.generations = 0

    async def __call__(self, agent: str, messages: list[Message], n: int, **sampling) -> list[Generation]:
        key = content_key(agent, messages, sampling)
        out = []
        for _ in range(n):
            slot = self.slots[key] = self.slots.get(key, -1) + 1
            sample_id = content_key(key, slot)[:16]
            self.generations += 1
            if any(FEEDBACK_MARK in m["content"] for m in messages):  # advice, not an answer: no tag
                out.append(Generation(sample_id, agent, f"{agent}: feedback (slot {slot})", "stop", 10, 5))
                continue
            q = self.world.quality(self.prompt.prompt_id, agent, messages, sampling, slot)
            out.append(Generation(sample_id, agent, f"{agent} answer [[q={q:.6f}]]", "stop", 10, 5))
        return out


async def tag_reward(texts: Sequence[str]) -> list[Score]:
    """The world's reward: the quality tag of each text, read back exactly."""
    return [Score(float(m.group(1))) if (m := TAG.search(t)) else Score(None, ERROR, "no quality tag") for t in texts]


# ---------------------------------------------------------------------------- running methods
@dataclass(frozen=True)
class Entry:
    """A method as the benchmark runs it."""

    label: str
    name: str  # registered method name
    options: dict


def entries() -> tuple[list[Entry], list[str]]:
    """Every registered method that has a budget fixed in advance, and why the others are skipped."""
    keep, skipped = [], []
    for name in method_names():
        if get_method(name).generations(M, EQUAL_N) is None:
            skipped.append(f"{name}: budget not fixed in advance (generations() is None)")
        else:
            keep.append(Entry(name, name, {}))
    return keep, skipped


def options_for(entry: Entry, m: int, n: int) -> tuple[dict, str | None]:
    """The entry's options at this budget, and a note when they had to change: TOA's default
    width W = floor(M n / 3) < M is refused (docs/methods.md §5.4); width = M is its named fix."""
    try:
        get_method(entry.name, **entry.options).check_budget(m, n)
        return entry.options, None
    except ValueError as exc:
        if entry.name == "toa" and "width" not in entry.options:
            return {**entry.options, "width": m}, f"width={m} at n={n} (default W < M)"
        raise ValueError(str(exc)) from None


async def run_budget(world: World, entry: Entry, prompts: list[Prompt], n: int) -> tuple[np.ndarray, list[int]]:
    """Best reward per prompt and generations per prompt of one method at n per agent."""
    options, _ = options_for(entry, M, n)
    method = get_method(entry.name, **options)
    agents = tuple(a.name for a in world.agents)
    best, spent = [], []
    for prompt in prompts:
        gen = SimulatedGenerate(world, prompt)
        out = await method.run(MethodContext(prompt, agents, n, gen, tag_reward, world.seed))
        rewards = [s.score.value for s in out.samples if s.generation.ok and s.score.ok]
        best.append(max(rewards) if rewards else math.nan)
        spent.append(gen.generations)
    return np.array(best), spent


@dataclass
class Curve:
    """One method's results: {generations per prompt: best reward per prompt}."""

    entry: Entry
    best: dict[int, np.ndarray] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    equal: int | None = None  # its generations at the equal budget (n * M; prs_feedback + 1)
    ns: dict[int, int] = field(default_factory=dict)  # n per agent -> generations per prompt


def simulate(world: World, prompts: list[Prompt], idx: np.ndarray) -> tuple[list[Curve], list[str]]:
    """Every method at every budget of BUDGET_NS, then EXTRA_NS for a method that has not
    reached the target, or whose bootstrap CI has not (`idx`: the resamples of the analysis).
    A budget a method cannot run (it raises) is skipped with its reason."""
    todo, skipped = entries()
    curves: list[Curve] = []

    async def add(curve: Curve, n: int) -> bool:
        entry = curve.entry
        try:
            options, note = options_for(entry, M, n)
            best, spent = await run_budget(world, entry, prompts, n)
        except Exception as exc:  # noqa: BLE001 - a method this world cannot serve is skipped, with why
            skipped.append(f"{entry.label}: at n={n}: {type(exc).__name__}: {exc}")
            return False
        expected = get_method(entry.name, **options).generations(M, n)
        if any(s != expected for s in spent):  # the budget rule, docs/methods.md §0.2
            raise AssertionError(f"{entry.label} at n={n}: spent {sorted(set(spent))} generations, "
                                 f"generations() says {expected}")
        curve.notes += [note] if note else []
        curve.best[expected], curve.ns[n] = best, expected
        curve.equal = expected if n == EQUAL_N else curve.equal
        return True

    async def everything() -> None:
        for entry in todo:
            curve = Curve(entry)
            for n in BUDGET_NS:  # a budget the method refuses is skipped; the method without
                await add(curve, n)  # its equal budget is left out (both said in `skipped`)
            if curve.equal is not None:
                curves.append(curve)
            elif curve.best:
                skipped.append(f"{entry.label}: left out, no result at n={EQUAL_N}")
        base = baseline(curves)
        for curve in curves:
            for n in EXTRA_NS:
                point, spread = reach(curve, base, idx)
                if np.isfinite(point) and np.isfinite(np.quantile(spread, 0.975, method="inverted_cdf")):
                    break
                if not await add(curve, n):
                    break

    asyncio.run(everything())
    return curves, skipped


# ---------------------------------------------------------------------------- statistics
def resamples(n_prompts: int, boot: int, seed: int) -> np.ndarray:
    """Bootstrap resamples of the prompts (boot x prompts indices), shared by every method:
    the comparisons with the baseline are paired."""
    return np.random.default_rng(seed).integers(0, n_prompts, size=(boot, n_prompts))


def baseline(curves: list[Curve]) -> np.ndarray:
    """The baseline's best reward per prompt at the equal budget (Random best-of-N)."""
    base = next(c for c in curves if c.entry.name == BASELINE)
    return base.best[base.equal]


def crossing(gens: np.ndarray, means: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Generations at which each row of `means` (one row per resample, columns in increasing
    `gens`) first reaches its `target`, interpolated linearly from the budget before; the first
    budget itself when it already reaches it (fewer were not measured), inf never."""
    reached = means >= target[:, None] - 1e-12  # the baseline meets its own target, whatever the summation order
    first = reached.argmax(axis=1)
    rows = np.arange(len(means))
    prev = np.maximum(first - 1, 0)
    m0, m1 = means[rows, prev], means[rows, first]
    frac = np.where(m1 > m0, (target - m0) / np.where(m1 > m0, m1 - m0, 1.0), 1.0)
    out = np.where(first == 0, gens[0], gens[prev] + frac * (gens[first] - gens[prev]))
    return np.where(reached.any(axis=1), out, np.inf)


def reach(curve: Curve, base: np.ndarray, idx: np.ndarray) -> tuple[float, np.ndarray]:
    """Generations to reach the baseline's mean best reward: the estimate, and one per resample
    (the target recomputed on the same resampled prompts)."""
    gens = np.array(sorted(curve.best))
    table = np.stack([curve.best[g] for g in gens], axis=1)  # prompts x budgets
    point = crossing(gens, table.mean(axis=0)[None, :], np.array([base.mean()]))[0]
    return float(point), crossing(gens, table[idx].mean(axis=1), base[idx].mean(axis=1))


@dataclass
class Row:
    label: str
    gens: float  # generations to reach the target (inf: not reached)
    gens_ci: tuple[float, float]
    at_first: bool  # reached at its smallest budget: an upper bound
    max_gens: int
    best: float  # mean best reward at the equal budget
    best_ci: tuple[float, float]
    delta: float  # best - the baseline's best, same prompts
    notes: list[str]


def analyse(curves: list[Curve], idx: np.ndarray) -> tuple[list[Row], float]:
    """A row per method, and the target (the baseline's mean best at the equal budget)."""
    base = baseline(curves)
    rows = []
    for curve in curves:
        point, spread = reach(curve, base, idx)
        eq = curve.best[curve.equal]
        rows.append(Row(curve.entry.label, point, tuple(np.quantile(spread, [0.025, 0.975], method="inverted_cdf")),
                        point == min(curve.best), max(curve.best), float(eq.mean()),
                        tuple(np.quantile(eq[idx].mean(axis=1), [0.025, 0.975])), float(eq.mean() - base.mean()),
                        curve.notes))
    return rows, float(base.mean())


def paired(curves: list[Curve], a: str, b: str, idx: np.ndarray) -> tuple[float, tuple[float, float]] | None:
    """Mean per-prompt difference a - b at the equal budget and its paired bootstrap 95 % CI."""
    by = {c.entry.label: c.best[c.equal] for c in curves}
    if a not in by or b not in by:
        return None
    diff = by[a] - by[b]
    return float(diff.mean()), tuple(np.quantile(diff[idx].mean(axis=1), [0.025, 0.975]))


# ---------------------------------------------------------------------------- printing
def pct(g: float, equal: int) -> str:
    return f"{100 * g / equal:.0f}%"


def gens_text(g: float, max_gens: int) -> str:
    return f">{max_gens}" if math.isinf(g) else f"{g:.1f}"


def table(rows: list[Row], target: float, equal: int) -> list[str]:
    """Per method: generations to reach the target as a share of `equal` (the ratio), then the
    absolute figures; methods in order of that share."""
    header = (f"{'method':18} {'gens to target':>14} {'(abs)':>7} {'95% CI':>14}   "
              f"{'best@' + str(equal):>8} {'95% CI':>16} {'vs ' + BASELINE:>10}")
    lines = [f"target: {BASELINE} best-of-{equal}, mean best reward {target:.4f}", header]
    for r in sorted(rows, key=lambda r: (r.gens, -r.best)):
        bound = "<=" if r.at_first else ">" if math.isinf(r.gens) else ""
        share = bound + pct(r.max_gens if math.isinf(r.gens) else r.gens, equal)
        ci = f"[{gens_text(r.gens_ci[0], r.max_gens)}, {gens_text(r.gens_ci[1], r.max_gens)}]"
        absolute = ("<=" if r.at_first else "") + gens_text(r.gens, r.max_gens)
        lines.append(f"{r.label:18} {share:>14} {absolute:>7} {ci:>14}   {r.best:>8.4f} "
                     f"[{r.best_ci[0]:.4f}, {r.best_ci[1]:.4f}] {r.delta:>+10.4f}"
                     + (f"   ({'; '.join(dict.fromkeys(r.notes))})" if r.notes else ""))
    return lines


def curve_lines(curves: list[Curve], m: int) -> list[str]:
    """Mean best reward at every budget run, by n per agent (prs_feedback spends one more)."""
    ns = sorted({n for c in curves for n in c.ns})
    lines = ["mean best reward by n per agent (generations per prompt):",
             f"{'method':18}" + "".join(f"{f'{n} ({n * m})':>10}" for n in ns)]
    for c in curves:
        lines.append(f"{c.entry.label:18}" + "".join(f"{c.best[c.ns[n]].mean():>10.4f}" if n in c.ns else f"{'':>10}"
                                                     for n in ns))
    return lines


def world_lines(world: World) -> list[str]:
    kind = "a refinement closes a share of the gap to the ceiling" if world.refine_helps \
        else "a refinement is a fresh answer of the refining agent (never helps)"
    scale = f", closes x {world.refine_scale}" if world.refine_scale != 1 and world.refine_helps else ""
    head = f"world {world.name}: {kind}{scale}; difficulty sd {world.difficulty_sd}, ceiling +{world.ceiling}, seed {world.seed}"
    lines = [head, "  agent   mean  spread  skill_sd  closes  refine_sd"]
    lines += [f"  {a.name:5} {a.mean:6.3f} {a.spread:7.3f} {a.skill_sd:9.3f} {a.closes:7.2f} {a.refine_sd:10.2f}"
              for a in world.agents]
    return lines


def headline(rows: list[Row], equal: int) -> str:
    """The closing line: TOA's generations to reach Random best-of-N as a share of N."""
    toa = next((r for r in rows if r.label == "toa"), None)
    if toa is None:
        return f"toa reaches random best-of-{equal} reward with n/a% of the generations (toa was skipped)"
    share = f">{pct(toa.max_gens, equal)}" if math.isinf(toa.gens) else ("<=" if toa.at_first else "") + pct(toa.gens, equal)
    return f"toa reaches random best-of-{equal} reward with {share} of the generations"


def verdict(curves: list[Curve], idx: np.ndarray, equal: int) -> str:
    """Whether TOA is worse than Parallel Ensemble at the equal budget beyond the noise."""
    got = paired(curves, "toa", "parallel_ensemble", idx)
    if got is None:
        return "no_refine: toa or parallel_ensemble was skipped"
    diff, (lo, hi) = got
    word = "worse than" if hi < 0 else "better than" if lo > 0 else "within the noise of"
    beyond = "" if word == "within the noise of" else " beyond the noise"
    return (f"no_refine: toa - parallel_ensemble at {equal} generations = {diff:+.4f} (paired 95% CI "
            f"[{lo:+.4f}, {hi:+.4f}]): toa is {word} parallel_ensemble{beyond}")


def paired_lines(curves: list[Curve], idx: np.ndarray, equal: int) -> list[str]:
    """toa minus every other method at the equal budget, per prompt, with paired CIs."""
    lines = [f"toa - method, best reward at {equal} generations, per prompt (paired 95% CI):"]
    for c in curves:
        got = paired(curves, "toa", c.entry.label, idx) if c.entry.label != "toa" else None
        if got is not None:
            diff, (lo, hi) = got
            lines.append(f"  toa - {c.entry.label:18} {diff:+.4f} [{lo:+.4f}, {hi:+.4f}]")
    return lines if len(lines) > 1 else []


def print_results(curves: list[Curve], skipped: list[str], idx: np.ndarray, m: int, equal: int) -> list[Row]:
    rows, target = analyse(curves, idx)
    for line in ([f"skipped {x}" for x in skipped] + table(rows, target, equal) + curve_lines(curves, m)
                 + paired_lines(curves, idx, equal)):
        print(line)
    return rows


def prompts_for(count: int) -> list[Prompt]:
    return [Prompt(f"s{i:04d}", f"Simulated prompt {i}: answer it well.") for i in range(count)]


# ---------------------------------------------------------------------------- (b) real models
def run_real(args: argparse.Namespace) -> None:
    """The same comparison through the `toa` flow on the embedded default agents and reward:
    one flow call per budget, every method at once, into one results root that outlives the
    process (content-addressed calls are shared across budgets, and the same command resumes
    where a stopped one left off). The equal budget runs first: later, smaller budgets find
    their requests' first slots already recorded. The tables are printed after every budget,
    so a stopped run still says what it measured. Needs the vLLM servers; not run in CI."""
    import throughput  # its AlpacaEval path and environment defaults

    from toa.config import default_agents
    from toa.db import query
    from toa.prompts import DEFAULT_PROMPTS
    from toa.servers.prefect_api import temporary_api  # the API `toa run` starts, ended with this process
    from toa.storage import Store

    m = len(default_agents())
    equal_n = 32 // m
    ns = [int(n) for n in args.real_ns.split(",")] if args.real_ns else real_budgets(m)
    source = ({"path": str(throughput.ALPACA), "text_field": "instruction", "id_field": "id",
               "reference_field": "reference_output", "limit": args.real_prompts}
              if throughput.ALPACA.exists() else {"path": DEFAULT_PROMPTS, "limit": args.real_prompts})
    todo, skipped = entries()
    curves = {e.name: Curve(e) for e in todo}
    per_prompt: dict[tuple[str, int], dict[str, float]] = {}
    root = Path(args.real_root)
    print(f"real: results root {root} (the same command resumes it); budgets n={ns}", flush=True)
    flow = []  # imported while the API starts
    with temporary_api(root / "logs", lambda: flow.append(import_module("toa.flows.synthesize").toa)):
        for n in ns:
            options = {}
            for e in todo:
                try:
                    options[e.name] = options_for(e, m, n)[0]
                except ValueError as exc:
                    skipped.append(f"{e.label} at n={n}: {exc}")
            start = time.perf_counter()
            result = flow[0](methods=sorted(options), n=n, results_root=str(root),
                             overrides={"prompts": source, "method_options": {k: v for k, v in options.items() if v}})
            print(f"n={n}: {len(options)} methods in {time.perf_counter() - start:.0f} s", flush=True)
            frame = query(Store(str(root)), "SELECT method, prompt_id, best_reward FROM prompts_best "
                                            "WHERE run_id = ? AND best_reward IS NOT NULL", [result["run_id"]])
            for method, prompt_id, value in frame.iter_rows():
                gens = get_method(method, **options[method]).generations(m, n)
                per_prompt.setdefault((method, gens), {})[prompt_id] = value
                curves[method].ns[n] = gens
                curves[method].equal = gens if n == equal_n else curves[method].equal
            print_real(curves, per_prompt, skipped, args, m, ns[:ns.index(n) + 1])
            print(spent_line(Store(str(root))), flush=True)


def real_budgets(m: int) -> list[int]:
    """--real's budgets in the order they run, as n per agent for m agents (REAL_GENS)."""
    return list(dict.fromkeys(max(1, g // m) for g in REAL_GENS))


def spent_line(store) -> str:
    """What the root's model calls were, read from the store: the same when a run is resumed or
    repeated (its time span includes any pause between a stop and the resume)."""
    from toa.db import query

    calls, failed, tokens, span = query(store, "SELECT count(*), count(*) FILTER (WHERE status <> 'ok'), "
                                               "sum(completion_tokens), max(created_at) - min(created_at) "
                                               "FROM calls").row(0)
    return (f"real: the root holds {calls} generations ({failed} failed), {tokens} completion tokens, "
            f"made over {span / 60:.0f} min")


def print_real(curves: dict[str, Curve], per_prompt: dict[tuple[str, int], dict[str, float]],
               skipped: list[str], args: argparse.Namespace, m: int, ns_done: list[int]) -> None:
    """The tables on the prompts every (method, budget) run so far scored."""
    ids = sorted(set.intersection(*(set(v) for v in per_prompt.values())))
    for (method, gens), values in per_prompt.items():
        curves[method].best[gens] = np.array([values[i] for i in ids])
    done = [c for c in curves.values() if c.equal in c.best]
    if curves[BASELINE] not in done:
        print(f"real: n={ns_done} done; no table before the equal budget n={32 // m} has run", flush=True)
        return
    print(f"real: {len(ids)} prompts scored by every (method, budget); M={m} embedded agents, "
          f"n={ns_done} done, default reward", flush=True)
    equal = 32 // m * m
    rows = print_results(done, skipped, resamples(len(ids), args.boot, args.seed), m, equal)
    print(headline(rows, equal), flush=True)


# ---------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", choices=["differing", "no_refine", "both"], default="both")
    p.add_argument("--prompts", type=int, default=200, help="simulated prompts")
    p.add_argument("--seed", type=int, default=0, help="seed of the world and of the bootstrap")
    p.add_argument("--boot", type=int, default=2000, help="bootstrap resamples")
    p.add_argument("--refine-scale", type=float, default=1.0,
                   help="multiply every agent's refinement gain (closes): how much a result rests on it")
    p.add_argument("--real", action="store_true", help="the embedded vLLM servers through the toa flow instead")
    p.add_argument("--real-prompts", type=int, default=64)
    p.add_argument("--real-root", default=str(Path(tempfile.gettempdir()) / "toa-search-efficiency-real"),
                   help="results root of --real, kept: the same command resumes it")
    p.add_argument("--real-ns", default="", help="--real budgets (n per agent) in order, e.g. 16,8; "
                   "default: 16,8,4,2,12,6 for two agents (REAL_GENS)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    print(cpu_line())
    if args.real:
        run_real(args)
        return
    names = ["no_refine", "differing"] if args.world == "both" else [args.world]  # differing's line ends the output
    prompts, idx = prompts_for(args.prompts), resamples(args.prompts, args.boot, args.seed)
    closing = []
    for name in names:
        world = replace(WORLDS[name], seed=args.seed, refine_scale=args.refine_scale)
        start = time.perf_counter()
        curves, skipped = simulate(world, prompts, idx)
        for line in world_lines(world):
            print(line)
        print(f"{args.prompts} prompts, M={M} agents, n={'/'.join(map(str, BUDGET_NS))} per agent (then "
              f"{'/'.join(map(str, EXTRA_NS))} where needed), {args.boot} bootstrap resamples; "
              f"{time.perf_counter() - start:.1f} s")
        rows = print_results(curves, skipped, idx, M, M * EQUAL_N)
        closing.append(verdict(curves, idx, M * EQUAL_N) if name == "no_refine" else headline(rows, M * EQUAL_N))
        print()
    for line in closing:
        print(line)


if __name__ == "__main__":
    main()
