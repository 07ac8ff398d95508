"""CustomReward: user callables by import path and by entry point, sync / async / batched,
and errors that become error Scores after the service's retries (never a number)."""

from __future__ import annotations

import importlib.metadata
import textwrap

import pytest

from toa.reward import RewardConfig, RewardService, build_backend
from toa.reward.custom import ENTRY_POINT_GROUP, CustomReward, resolve_callable
from toa.rows import ERROR, OK, Prompt, RewardRecord, Score

USER_MODULE = '''
import asyncio

CALLS = []


def overlap(prompt, response, reference):
    """Share of reference words the response contains."""
    CALLS.append(response)
    ref = set((reference or "").lower().split())
    return len(ref & set(response.lower().split())) / max(len(ref), 1)


async def length_async(prompt, response, reference):
    await asyncio.sleep(0)
    return float(len(response))


def lengths(items):
    return [float(len(r)) for _, r, _ in items]
lengths.batched = True


def broken(prompt, response, reference):
    raise RuntimeError("scorer crashed")


def picky(prompt, response, reference):
    return None if response == "skip" else 1.0


class Scorer:
    @staticmethod
    def score(prompt, response, reference):
        return 2.0
'''


@pytest.fixture
def user_mod(tmp_path, monkeypatch):
    """A user's reward module on sys.path, imported fresh for each test."""
    import sys

    (tmp_path / "my_rewards.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("my_rewards", None)
    yield "my_rewards"
    sys.modules.pop("my_rewards", None)


P = Prompt("p1", "Where is Paris?", reference="Paris is in France")


def service(backend) -> tuple[RewardService, list[RewardRecord]]:
    records: list[RewardRecord] = []
    return RewardService(backend, sink=records.append, backoff_s=0.001), records


async def test_sync_callable_by_import_path_and_cache(user_mod):
    rm = CustomReward(f"{user_mod}:overlap")
    svc, records = service(rm)
    scores = await svc.score(P, ["Paris is in France", "no idea"])
    assert scores == [Score(1.0, OK, None), Score(0.0, OK, None)]
    assert records[0].reward_id == rm.identity
    assert await svc.score(P, ["Paris is in France"]) == [Score(1.0, OK, None)]
    assert svc.backend_calls == 1 and len(rm.fn.__globals__["CALLS"]) == 2  # cached, not re-run


async def test_async_and_batched_callables(user_mod):
    items = [(P, "ab"), (P, "abcd")]
    assert await CustomReward(f"{user_mod}:length_async").score_batch(items) == [
        Score(2.0, OK, None), Score(4.0, OK, None)]
    batched = CustomReward(f"{user_mod}:lengths")
    assert batched.batched
    assert await batched.score_batch(items) == [Score(2.0, OK, None), Score(4.0, OK, None)]
    assert await CustomReward(f"{user_mod}:Scorer.score").score_batch(items[:1]) == [
        Score(2.0, OK, None)]


async def test_raising_callable_becomes_error_after_retries(user_mod):
    svc, records = service(CustomReward(f"{user_mod}:broken"))
    (score,) = await svc.score(P, ["anything"])
    assert score.status == ERROR and score.value is None
    assert score.error == "RuntimeError: scorer crashed"
    assert svc.backend_calls == 3  # first try + 2 retries
    assert records[0].status == ERROR and records[0].value is None


async def test_none_fails_one_item_only(user_mod):
    svc, _ = service(CustomReward(f"{user_mod}:picky"))
    ok, bad = await svc.score(P, ["fine", "skip"])
    assert ok == Score(1.0, OK, None)
    assert bad.status == ERROR and bad.value is None and "non-finite" in bad.error


def test_identity_follows_the_source(user_mod, tmp_path):
    import sys

    a = CustomReward(f"{user_mod}:overlap")
    assert a.identity.startswith(f"custom:{user_mod}:overlap:")
    assert CustomReward(f"{user_mod}:overlap").identity == a.identity
    (tmp_path / "my_rewards.py").write_text(
        textwrap.dedent(USER_MODULE).replace("/ max(len(ref), 1)", "/ max(len(ref), 2)"))
    sys.modules.pop(user_mod)
    assert CustomReward(f"{user_mod}:overlap").identity != a.identity  # edited code, new key


async def test_entry_point(user_mod, monkeypatch):
    ep = importlib.metadata.EntryPoint(name="overlap", value=f"{user_mod}:overlap",
                                       group=ENTRY_POINT_GROUP)
    seen = []

    def fake_entry_points(**kw):
        seen.append(kw)
        return importlib.metadata.EntryPoints([ep] if kw.get("group") == ENTRY_POINT_GROUP else [])

    monkeypatch.setattr(importlib.metadata, "entry_points", fake_entry_points)
    rm = build_backend(RewardConfig(kind="custom", function="overlap"))
    assert isinstance(rm, CustomReward) and rm.identity.startswith(f"custom:{user_mod}:overlap:")
    assert (await rm.score_batch([(P, "Paris is in France")]))[0].value == 1.0
    assert seen == [{"group": ENTRY_POINT_GROUP}]
    with pytest.raises(LookupError, match="no custom reward named 'missing'"):
        resolve_callable("missing")


def test_bad_specs(user_mod):
    with pytest.raises(ModuleNotFoundError):
        CustomReward("no_such_module_xyz:f")
    with pytest.raises(AttributeError):
        CustomReward(f"{user_mod}:nope")
    with pytest.raises(ValueError):
        build_backend(RewardConfig(kind="custom"))
    assert RewardConfig(kind="custom", function="m:f").fingerprint()["function"] == "m:f"
