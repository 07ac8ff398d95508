"""Attach to an OpenAI-compatible server that toa does not start (a shared vLLM, a hosted API).

The key is looked up in this order: `spec.api_key`, the environment variable `spec.api_key_env`,
the Prefect Secret block `spec.api_key_block`, and finally the placeholder "EMPTY" that keyless
local servers accept. A named source that yields nothing is an error, not a silent "EMPTY".
Prefect is imported only when a block is named, so this module stays plain Python.
"""

from __future__ import annotations

import os

from pydantic import SecretStr

from toa.errors import UserError
from toa.servers.spec import AttachSpec, Endpoint


class EndpointUnreachable(UserError, ConnectionError):
    """An attached endpoint cannot be reached (wrong URL, server down)."""


class EndpointRejectedKey(UserError, PermissionError):
    """An attached endpoint answers 401/403 to the configured key."""


def attach(alias: str, spec: AttachSpec) -> Endpoint:
    """An Endpoint for the server described by `spec`, with its key resolved."""
    base_url = spec.base_url.rstrip("/")
    if not base_url.endswith("/v1"):
        base_url += "/v1"
    return Endpoint(alias=alias, base_url=base_url, model=spec.model,
                    api_key=resolve_api_key(alias, spec),
                    identity=f"attach:{base_url}:{spec.model}",
                    supports_n=spec.supports_n, max_model_len=None,
                    supports_logprobs=spec.supports_logprobs)


def probe(endpoint: Endpoint, timeout_s: float = 10.0) -> None:
    """Fail before any work when the server cannot be reached or rejects the key, with a
    message naming the agent and URL (never the key). Any other answer passes: a server that
    does not implement GET /models is still usable for chat completions."""
    import httpx

    url = f"{endpoint.base_url}/models"
    headers = {"Authorization": f"Bearer {endpoint.api_key.get_secret_value()}"}
    try:
        status = httpx.get(url, headers=headers, timeout=timeout_s).status_code
    except httpx.TransportError as exc:
        raise EndpointUnreachable(f"server {endpoint.alias!r}: cannot reach {endpoint.base_url} "
                              f"({type(exc).__name__}); is it running and is base_url right?") from None
    if status in (401, 403):
        raise EndpointRejectedKey(f"server {endpoint.alias!r} at {endpoint.base_url} rejected the API key "
                              f"(HTTP {status}); check api_key / api_key_env / api_key_block")


def resolve_api_key(alias: str, spec: AttachSpec) -> SecretStr:
    if spec.api_key is not None:
        return spec.api_key
    if spec.api_key_env:
        value = os.environ.get(spec.api_key_env)
        if not value:
            raise UserError(f"server {alias!r}: environment variable {spec.api_key_env} "
                             "(api_key_env) is not set or empty")
        return SecretStr(value)
    if spec.api_key_block:
        return SecretStr(_load_secret_block(alias, spec.api_key_block))
    return SecretStr("EMPTY")


def _load_secret_block(alias: str, block: str) -> str:
    try:
        from prefect.blocks.system import (
            Secret,  # lazy: only flows that name a block need it
        )
        value = Secret.load(block).get()
    except Exception as exc:  # noqa: BLE001 -- any failure to load; the block's value is never part of the message
        raise ValueError(f"server {alias!r}: cannot load Prefect Secret block {block!r} "
                         f"(api_key_block): {type(exc).__name__}") from None
    if not value:
        raise ValueError(f"server {alias!r}: Prefect Secret block {block!r} is empty")
    return str(value)
