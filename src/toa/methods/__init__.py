"""Sampling methods. Importing this package registers every method; a new method is one new
module plus one import line here."""

from toa.methods import parallel  # noqa: F401  (registers random, parallel_ensemble)
from toa.methods import prs, sequential, moa, mcts  # noqa: F401  (prs, prs_feedback, sequential_refine, moa, toa)
from toa.methods.base import Method, MethodContext, get_method, method_names, register

__all__ = ["Method", "MethodContext", "get_method", "method_names", "register"]
