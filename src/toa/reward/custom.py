"""Custom rewards: a user's Python callable, named by import path or by entry point.

Naming:
- "package.module:function" (or "package.module:Class.method"): imported directly;
- a bare name: the entry point of that name in group "toa.rewards", so a package can publish
  a reward with `[project.entry-points."toa.rewards"] myreward = "mypkg.rewards:score"`.

Contract (one, documented):
    fn(prompt_text: str, response: str, reference: str | None) -> float
The function may be `async def`. A function with the attribute `batched = True` instead takes
one list of (prompt_text, response, reference) tuples and returns a list of floats of the same
length (sync or async): use it when the scorer has its own batching (a model, an HTTP API).
Sync functions run in a worker thread (asyncio.to_thread) so a slow one never blocks the loop;
async single-item calls of one batch run concurrently.

Errors are data: an exception is NOT caught here. It fails the backend call, the service retries
it, and after the retries every item of that batch becomes an error Score with the message (never
a number). To fail ONE item without failing its batch, return None or float("nan"): the service
turns an ok-but-non-finite value into an error Score for that item.

Identity = "custom:<module:qualname>:<sha256 of the function's source, 12 hex>" (qualname
instead of source when inspect cannot read it, e.g. a C builtin): editing the function's code
changes the identity, so cached rewards of the old code are not served for the new one.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import importlib.metadata
import inspect
from typing import Any, Callable

from toa.rows import OK, Prompt, Score

ENTRY_POINT_GROUP = "toa.rewards"


def resolve_callable(spec: str) -> tuple[Callable[..., Any], str]:
    """(function, "module:qualname") for an import path or an entry-point name."""
    if ":" not in spec:
        spec = _entry_point_value(spec)
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"custom reward must be 'package.module:function', got {spec!r}")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"custom reward {spec!r} is not callable")
    return obj, f"{module_name}:{attr}"


def _entry_point_value(name: str) -> str:
    found = [ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
    if not found:
        raise LookupError(f"no custom reward named {name!r}: expected 'package.module:function' "
                          f"or an entry point in group {ENTRY_POINT_GROUP!r}")
    return found[0].value


def source_sha(fn: Callable[..., Any]) -> str:
    """sha256 of the function's source (its qualname when the source is unavailable), 12 hex."""
    try:
        text = inspect.getsource(fn)
    except (OSError, TypeError):
        text = getattr(fn, "__qualname__", repr(fn))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def _is_async(fn: Callable[..., Any]) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None))


def _to_score(value: Any) -> Score:
    """A float becomes an ok Score; None/NaN pass as non-finite (the service makes them errors)."""
    if value is None:
        return Score(None, OK, None)
    return Score(float(value), OK, None)  # non-numeric raises: batch fails, retried, then error


class CustomReward:
    """`RewardBackend` around a user callable (see the module docstring for the contract)."""

    def __init__(self, function: str) -> None:
        self.fn, self.path = resolve_callable(function)
        self.batched = bool(getattr(self.fn, "batched", False))
        self.identity = f"custom:{self.path}:{source_sha(self.fn)}"

    async def score_batch(self, items: list[tuple[Prompt, str]]) -> list[Score]:
        args = [(p.text, r, p.reference) for p, r in items]
        if self.batched:
            values = await self._call_batched(args)
        elif _is_async(self.fn):
            values = await asyncio.gather(*(self.fn(*a) for a in args))
        else:
            values = await asyncio.to_thread(lambda: [self.fn(*a) for a in args])
        return [_to_score(v) for v in values]

    async def _call_batched(self, args: list[tuple[str, str, str | None]]) -> list[Any]:
        if _is_async(self.fn):
            values = await self.fn(args)
        else:
            values = await asyncio.to_thread(self.fn, args)
        values = list(values)
        if len(values) != len(args):
            raise ValueError(f"batched custom reward returned {len(values)} values "
                             f"for {len(args)} items")
        return values


__all__ = ["CustomReward", "resolve_callable", "source_sha", "ENTRY_POINT_GROUP"]
