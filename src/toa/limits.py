"""Per-endpoint limits that hold across processes and machines: Prefect global concurrency limits.

An agent's `global_limit` names a Prefect global concurrency limit. Every HTTP request to
that endpoint, from any process or machine using the same Prefect API, holds one of its slots
while it is in flight (`concurrency`), and first takes a slot of `<name>-rate`, a limit whose
slots decay at `requests_per_minute / 60` per second (`rate_limit`), so requests start no
faster than that rate. The per-process `max_concurrency` semaphore still applies on top.

toa creates or updates the limits when an engine starts. They live in the Prefect API, so
they need one that every worker shares (PREFECT_API_URL: `prefect server start` or Prefect
Cloud). Without PREFECT_API_URL, Prefect would run a private, temporary API in each process
and nothing would be shared, so toa refuses to start rather than silently not limiting.
Acquisition is strict: a limit deleted while the run goes fails the calls (error rows naming
it) instead of running unlimited.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager, nullcontext
from dataclasses import dataclass
from typing import Any


class GlobalLimitError(RuntimeError):
    """Global limits are configured but cannot be applied (no shared Prefect API, API error)."""


@dataclass(frozen=True)
class LimitNames:
    """The Prefect limits one endpoint's requests take: what the request layer needs."""

    concurrency: str | None = None  # held while a request is in flight
    rate: str | None = None  # one slot taken (and left to decay) before each request
    timeout_s: float | None = None


def names_for(limit: Any) -> LimitNames | None:
    """The limit names of an agent's `global_limit` config (None: no global limit)."""
    if limit is None:
        return None
    concurrency = limit.name if limit.concurrency is not None or limit.requests_per_minute is None else None
    rate = f"{limit.name}-rate" if limit.requests_per_minute is not None else None
    return LimitNames(concurrency, rate, limit.timeout_s)


def rate_slots(requests_per_minute: float) -> tuple[int, float]:
    """(slots, decay per second) of a rate limit: a burst of at most one second's requests,
    then the rate. Slots are at least 1, or no request could ever start."""
    per_second = requests_per_minute / 60
    return max(1, math.floor(per_second)), per_second


def require_shared_api(agents: Iterable[Any]) -> None:
    """Fail clearly before any work when global limits are set but no Prefect API is shared."""
    from prefect.settings import get_current_settings

    limited = [a.alias for a in agents if getattr(a, "global_limit", None) is not None]
    if limited and not get_current_settings().api.url:
        raise GlobalLimitError(
            f"agents {limited} set global_limit, which needs a Prefect API shared by every worker: set "
            "PREFECT_API_URL (`prefect server start`, or Prefect Cloud). Without it each process would get "
            "a private temporary API and the limits would not hold; remove global_limit to rely on "
            "max_concurrency alone.")


async def ensure_limits(agents: Iterable[Any]) -> None:
    """Create or update the Prefect limits the agents ask for; check the ones they only name."""
    agents = [a for a in agents if getattr(a, "global_limit", None) is not None]
    if not agents:
        return
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    require_shared_api(agents)
    async with get_client() as client:
        for agent in agents:
            limit = agent.global_limit
            try:
                if limit.concurrency is not None:
                    await _upsert(client, limit.name, limit.concurrency, None)
                elif limit.requests_per_minute is None:
                    await client.read_global_concurrency_limit_by_name(limit.name)
                if limit.requests_per_minute is not None:
                    await _upsert(client, f"{limit.name}-rate", *rate_slots(limit.requests_per_minute))
            except ObjectNotFound:
                raise GlobalLimitError(
                    f"agent {agent.alias!r}: Prefect global concurrency limit {limit.name!r} does not exist; create "
                    f"it (`prefect global-concurrency-limit create {limit.name} --limit 8`) or set "
                    "global_limit.concurrency so toa creates it") from None
            except GlobalLimitError:
                raise
            except Exception as exc:
                raise GlobalLimitError(f"agent {agent.alias!r}: cannot set up Prefect limit {limit.name!r}: "
                                       f"{type(exc).__name__}: {exc}") from exc


async def _upsert(client, name: str, slots: int, decay: float | None) -> None:
    from prefect.exceptions import ObjectAlreadyExists

    try:
        await client.upsert_global_concurrency_limit_by_name(name, slots, decay)
    except ObjectAlreadyExists:  # another worker created it between our read and create
        await client.upsert_global_concurrency_limit_by_name(name, slots, decay)


@asynccontextmanager
async def request_slot(names: LimitNames | None) -> AsyncIterator[None]:
    """Hold what one request needs: a concurrency slot while in flight, after a rate slot."""
    if names is None:
        yield
        return
    from prefect.concurrency.asyncio import concurrency, rate_limit

    held = concurrency(names.concurrency, timeout_seconds=names.timeout_s, strict=True,
                                               raise_on_lease_renewal_failure=False) if names.concurrency else nullcontext()
    async with held:
        if names.rate:  # inside the slot: request starts are spaced by the rate
            await rate_limit(names.rate, timeout_seconds=names.timeout_s, strict=True)
        yield
