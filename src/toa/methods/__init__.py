"""Sampling methods. Importing this package registers every method; a new method is one new
module plus one import line here."""

from toa.methods import (  # noqa: F401  (prs, prs_feedback, sequential_refine, moa, toa)
    dialogue,
    mcts,
    moa,
    parallel,
    prs,
    sequential,
    step_mcts,
)
from toa.methods.base import Method, MethodContext, get_method, method_names, register

__all__ = ["Method", "MethodContext", "get_method", "method_names", "register"]
