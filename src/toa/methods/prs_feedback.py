"""PRS with feedback (docs/methods.md §2): PRS (toa.methods.prs) plus one feedback call on y*
against a preference text, put into the refine prompt. The PRS paper's variant."""

from __future__ import annotations

from toa.methods.base import register
from toa.methods.prs import PRS


@register
class PRSFeedback(PRS):
    """PRS with one feedback call on y* (the PRS paper's variant)."""

    name = "prs_feedback"
    feedback = True

    def generations(self, m: int, n: int) -> int:
        return n * m + 1  # the feedback call on y* comes on top of the equal budget
