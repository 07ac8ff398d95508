"""Attach to an OpenAI-compatible server that toa does not start (a shared vLLM, a hosted API).

The key is looked up in this order: `spec.api_key`, the environment variable `spec.api_key_env`,
the Prefect Secret block `spec.api_key_block`, and finally the placeholder "EMPTY" that keyless
local servers accept. A named source that yields nothing is an error, not a silent "EMPTY".
Prefect is imported only when a block is named, so this module stays plain Python.

Identity (docs/design.md §4.1): an attached endpoint is `attach:<base_url>:<model>`, plus
`@<revision>` when the spec declares one; a new revision is a new model, so nothing recorded
under the old one is replayed. What the URL and name cannot show (a model redeployed behind the
same ones) the behavioural fingerprint shows: `fingerprint` makes one greedy (temperature 0),
seeded, `PROBE_TOKENS`-token completion of a fixed prompt, with token logprobs where the
endpoint gives them, rounded to `LOGPROB_DECIMALS` so float noise does not flip it, and hashes
it. toa.identity records it per endpoint identity and compares.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from pydantic import SecretStr

from toa.errors import UserError
from toa.servers.spec import AttachSpec, Endpoint

# The behavioural probe. A prompt whose greedy continuation is not a fixed fact, so that
# fine-tunes of one base model tend to continue it differently; 8 tokens keep it cheap.
PROBE_MESSAGES = [{"role": "user", "content": "Continue this sentence in a few words: "
                   "The old lighthouse keeper opened the door and"}]
PROBE_TEXT = "The old lighthouse keeper opened the door and saw the sea."  # for reward models (/classify)
PROBE_TOKENS = 8
PROBE_SEED = 0
LOGPROB_DECIMALS = 1  # GPU batch noise moves logprobs by ~1e-3; a different model moves them by far more
PROBE_ATTEMPTS = 3  # a 429/5xx or a dropped connection is retried, after 1 s then 2 s
PROBE_BACKOFF_S = 1.0


class EndpointUnreachable(UserError, ConnectionError):
    """An attached endpoint cannot be reached (wrong URL, server down)."""


class EndpointRejectedKey(UserError, PermissionError):
    """An attached endpoint answers 401/403 to the configured key."""


class ProbeFailed(UserError):
    """The endpoint refused the identity probe (a 4xx other than 401/403/429): a setting to fix."""


class ProbeUnanswered(ConnectionError):
    """The identity probe got no answer (5xx, 429, a dropped connection) after its retries: the
    server is failing now, which a run records as failed calls (docs/design.md §4.3)."""


@dataclass(frozen=True)
class Fingerprint:
    """The hash of an endpoint's answer to the probe (`value`, 16 hex) and what was hashed."""

    value: str
    answer: dict[str, Any]


def attach(alias: str, spec: AttachSpec) -> Endpoint:
    """An Endpoint for the server described by `spec`, with its key resolved."""
    base_url = spec.base_url.rstrip("/")
    if not base_url.endswith("/v1"):
        base_url += "/v1"
    revision = f"@{spec.revision}" if spec.revision else ""
    return Endpoint(alias=alias, base_url=base_url, model=spec.model,
                    api_key=resolve_api_key(alias, spec),
                    identity=f"attach:{base_url}:{spec.model}{revision}",
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


def fingerprint(endpoint: Endpoint, kind: str = "chat", timeout_s: float = 30.0) -> Fingerprint:
    """The endpoint's behavioural fingerprint (module docstring). `kind` "chat" probes
    /chat/completions; "classify" (a reward model on vLLM's pooling runner) posts `PROBE_TEXT`
    to /classify and hashes its raw scores, rounded the same way."""
    if kind == "classify":
        url = endpoint.base_url.removesuffix("/v1") + "/classify"
        body = {"model": endpoint.model, "input": [PROBE_TEXT], "use_activation": False}
        data = _post_probe(endpoint, url, body, timeout_s)
        answer = {"model": data.get("model"),
                  "scores": [[_rounded(p) for p in d.get("probs") or []] for d in data.get("data") or []]}
    else:
        body = {"model": endpoint.model, "messages": PROBE_MESSAGES, "max_tokens": PROBE_TOKENS,
                "temperature": 0, "seed": PROBE_SEED}
        if endpoint.supports_logprobs:
            body["logprobs"] = True
        data = _post_probe(endpoint, f"{endpoint.base_url}/chat/completions", body, timeout_s)
        answer = _chat_answer(endpoint, data)
    canonical = json.dumps(answer, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return Fingerprint(hashlib.sha256(canonical.encode()).hexdigest()[:16], answer)


def _chat_answer(endpoint: Endpoint, data: dict) -> dict[str, Any]:
    """What of a chat answer is hashed: the model name the server reports (a hosted alias
    resolves to a dated snapshot), the text, the finish reason, each token's rounded logprob."""
    try:
        choice = data["choices"][0]
        text = choice["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise ProbeFailed(f"server {endpoint.alias!r} at {endpoint.base_url}: the identity probe got an answer "
                          f"without a message ({str(data)[:200]}); is it an OpenAI-compatible chat endpoint?") from None
    tokens = ((choice.get("logprobs") or {}).get("content")) or None
    return {"model": data.get("model"), "text": text, "finish_reason": choice.get("finish_reason"),
            "logprobs": [[t.get("token"), _rounded(t.get("logprob"))] for t in tokens] if tokens else None}


def _rounded(x: Any) -> Any:
    # + 0.0 turns -0.0 into 0.0, so a logprob of -0.04 and one of 0.0 hash alike
    return round(float(x), LOGPROB_DECIMALS) + 0.0 if isinstance(x, (int, float)) else x


def _post_probe(endpoint: Endpoint, url: str, body: dict, timeout_s: float) -> dict:
    """POST the probe, retrying transient failures (then ProbeUnanswered); a clear UserError
    for a refusal."""
    import httpx

    headers = {"Authorization": f"Bearer {endpoint.api_key.get_secret_value()}"}
    loopback = (urlsplit(url).hostname or "") in ("127.0.0.1", "localhost", "::1")
    what = f"server {endpoint.alias!r} at {endpoint.base_url} (model {endpoint.model!r})"
    status, text = None, ""
    with httpx.Client(timeout=timeout_s, trust_env=not loopback) as client:  # no proxy for loopback
        for attempt in range(PROBE_ATTEMPTS):
            if attempt:
                time.sleep(PROBE_BACKOFF_S * 2 ** (attempt - 1))  # backoff before a retry, not a readiness wait
            try:
                resp = client.post(url, json=body, headers=headers)
            except httpx.TransportError as exc:
                status, text = None, type(exc).__name__
                continue
            status, text = resp.status_code, resp.text[:200]
            if status in (401, 403):
                raise EndpointRejectedKey(f"{what} rejected the API key (HTTP {status}); "
                                          "check api_key / api_key_env / api_key_block")
            if status == 200:
                return resp.json()
            if status != 429 and status < 500:
                break  # a 4xx will not change on a retry
    if status is None or status == 429 or status >= 500:
        raise ProbeUnanswered(f"{what}: no answer to the identity probe after {PROBE_ATTEMPTS} tries "
                              f"({f'HTTP {status}: {text}' if status else text})")
    raise ProbeFailed(f"{what}: the identity probe (one greedy {PROBE_TOKENS}-token request, seed {PROBE_SEED}) "
                      f"failed with HTTP {status}: {text}. toa asks it once per run to tell whether the model "
                      f"behind the endpoint changed since its calls were recorded; check that the model is "
                      f"served there (supports_logprobs = false if it refuses logprobs)")


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
