"""PRS, preference-guided reflective sampling (docs/methods.md §2; PRS paper arXiv 2408.12163, used
as a single-agent baseline in the TOA paper arXiv 2412.17061).

One agent (the first configured) gets the equal budget N = n * M, split into N0 = floor(N / 2)
first-layer samples of the prompt and N1 = N - N0 refinements of the best of them, y*:

    layer 0: N0 samples of Q, scored against Q; y* = the best (first on ties)
    layer 1: N1 samples of refine(Q, y*), scored against the ORIGINAL Q

"prs" is the variant without feedback (the TOA paper's baseline). "prs_feedback" first asks the
agent once for feedback on y* with respect to a preference text z (default: templates
preference.txt) and puts that feedback into the refine prompt.

Decisions where the rules are silent:
- The feedback call is an EXTRA generation on top of N: the N samples that compete for the best
  response stay N0 + N1 = n * M, as in every other method, and the feedback costs one more call
  whose tokens are recorded. It is kept as a Sample with action `<agent>_feedback`, depth 1,
  parent y*, order between the layers, and a Score with status "skipped" (it is advice, not a
  response to Q, so it is never scored and can never be the best response).
- If the feedback call fails, the refinements go ahead without a feedback block (the failed
  call stays a Sample with its error).
- N = 1 (one agent, n = 1) would give N0 = 0 and nothing to refine; then N0 = 1, N1 = 0.
- If no layer-0 sample has a reward (every generation or score failed), there is no y* and the
  refinement layer is not drawn: the output holds the N0 failed samples only, and a rerun
  retries them. Rewards of errors are never turned into 0.
"""

from __future__ import annotations

from pydantic import Field

from toa.methods.base import Method, MethodContext, Options, register, score_all, user
from toa.rows import SKIPPED, Generation, MethodOutput, Sample, Score
from toa.templates import load

DEFAULT_PREFERENCE = load("preference").text
FEEDBACK_SKIPPED = Score(None, SKIPPED, "feedback is advice on y*, not a response to the prompt")
# Why a fixed header here and not a template file: it only frames the model's own feedback
# inside refine.txt's optional {feedback} slot; the full request text is in the cache key anyway.
FEEDBACK_BLOCK = "## Feedback on the answer below (address every point)\n{feedback}\n\n"


def best_index(scores: list[Score]) -> int | None:
    """Index of the highest raw reward among scored samples, first on ties; None if none scored."""
    scored = [(s.value, -i) for i, s in enumerate(scores) if s.ok]
    return -max(scored)[1] if scored else None


class PRSOptions(Options):
    preference: str | None = Field(None, description="The preference text z the feedback call judges y* against (prs_feedback); None: templates/preference.txt.")


@register
class PRS(Method):
    """PRS without feedback: the TOA paper's baseline."""

    name = "prs"
    Options = PRSOptions
    feedback = False

    @property
    def preference(self) -> str:
        return self.options.preference or DEFAULT_PREFERENCE

    async def run(self, ctx: MethodContext) -> MethodOutput:
        agent, n_total = ctx.agents[0], ctx.budget
        n0 = max(1, n_total // 2)  # N = 1 would leave nothing to refine: draw it from Q
        layer0 = await ctx.generate(agent, user(ctx.prompt.text), n0)
        scores0 = await score_all(ctx, layer0)
        samples = [Sample(g, s, f"{agent}_layer_0", depth=0, order=i)
                   for i, (g, s) in enumerate(zip(layer0, scores0))]
        best = best_index(scores0)
        if best is None:
            return MethodOutput(samples)  # no y* to refine: see the module docstring
        y_star = layer0[best]
        feedback = ""
        if self.feedback:
            fb = await self._feedback(ctx, agent, y_star)
            samples.append(Sample(fb, FEEDBACK_SKIPPED, f"{agent}_feedback", y_star.sample_id, 1, len(samples)))
            feedback = FEEDBACK_BLOCK.format(feedback=fb.text) if fb.ok and fb.text else ""
        prompt = load("refine").render(question=ctx.prompt.text, answer=y_star.text or "", feedback=feedback)
        layer1 = await ctx.generate(agent, user(prompt), n_total - n0) if n_total > n0 else []
        scores1 = await score_all(ctx, layer1)  # ctx.reward is bound to the original prompt
        start = len(samples)
        samples += [Sample(g, s, f"{agent}_layer_1", y_star.sample_id, 1, start + i)
                    for i, (g, s) in enumerate(zip(layer1, scores1))]
        return MethodOutput(samples)

    async def _feedback(self, ctx: MethodContext, agent: str, y_star: Generation) -> Generation:
        prompt = load("feedback").render(question=ctx.prompt.text, answer=y_star.text or "",
                                         preference=self.preference)
        return (await ctx.generate(agent, user(prompt), 1))[0]
