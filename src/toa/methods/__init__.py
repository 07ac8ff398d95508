"""Sampling methods. Importing this package registers every method; a new method is one new
module, named after the method's registered name, plus one import line here."""

from toa.methods import (  # noqa: F401  (each module registers its method)
    ab_mcts,
    moa,
    optima,
    parallel_ensemble,
    prs,
    prs_feedback,
    random,
    self_moa,
    sequential_refine,
    step_mcts,
    toa,
)
from toa.methods.base import (
    Method,
    MethodContext,
    Options,
    get_method,
    method_class,
    method_names,
    register,
)

__all__ = ["Method", "MethodContext", "Options", "get_method", "method_class", "method_names", "register"]
