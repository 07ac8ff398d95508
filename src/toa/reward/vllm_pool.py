"""vLLM-served reward models: a sequence-classification reward model (one output, e.g. the
Skywork-Reward family) behind vLLM's pooling runner, scored through its `/classify` endpoint.

Defaults and why:
- RAW scores: every request sends `use_activation: false`, so vLLM returns the classifier's
  logit instead of its sigmoid/softmax (a 1-label model would otherwise come back squashed
  into (0, 1); TOA's sigmoid(r/tau) belongs to the method). `label_index` (default 0) picks
  the output of a multi-output head.
- One HTTP request per micro-batch: `/classify` takes a list input, so the service's batch
  (default 64 items) is one request and vLLM batches it internally.
- The chat template is applied client-side with the tokenizer of the model folder ([user:
  prompt, assistant: response], no generation prompt, exactly like the transformers backend),
  and token ids are sent, so the server never re-tokenises rendered text differently. An item
  longer than the server's context is an error Score for that item only, never truncated.
  Without a local tokenizer (an attached server whose weights are elsewhere), each item goes
  as a chat-style `/classify` request (`messages`), concurrently, and the server applies its
  own template: `/classify` accepts one conversation per request.
- Attach (an `Endpoint`: base_url, served model, key) or launch (a `LaunchSpec`): a launched
  server gets `--runner pooling` added, is started lazily by the first `score_batch` (or by
  `start()`), in a thread, and is stopped by `close()`; a closed backend raises on
  `score_batch` (the service records error Scores) rather than quietly starting a new server.

Identity = "vllm:<served model identity>" (servers.vllm.model_identity for a launched or local
model: served name + content hash of the folder's weights, tokenizer and configs, cached per
file version (toa.identity) + chat template hash; for an attached one, the Endpoint's identity,
with its declared revision, its behavioural fingerprint checked by toa.identity.verify_attached
before the run), plus ":label=<i>" when label_index is not 0.
"""

from __future__ import annotations

import asyncio
import tempfile
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from toa.reward.service import error_score
from toa.rows import ERROR, OK, Prompt, Score
from toa.servers.spec import Endpoint, LaunchSpec, chat_template_text

POOLING_FLAGS = ["--runner", "pooling"]


def pooling_spec(spec: LaunchSpec) -> LaunchSpec:
    """`spec` with the pooling runner requested (unless its extra_args already choose one)."""
    if "--runner" in spec.extra_args or any(a.startswith("--runner=") for a in spec.extra_args):
        return spec
    return spec.model_copy(update={"extra_args": [*POOLING_FLAGS, *spec.extra_args]})


def launched_identity(alias: str, spec: LaunchSpec) -> str:
    """The identity start_vllm will give the server, computed without starting it."""
    from toa.servers.vllm import model_identity, resolve_model_dir

    served = spec.served_model_name or alias
    return model_identity(resolve_model_dir(spec.model), served, chat_template_text(spec.chat_template))


def _loopback(url: str) -> bool:
    return (urlsplit(url).hostname or "") in ("127.0.0.1", "localhost", "::1")


class VllmReward:
    """RewardBackend over a vLLM `/classify` endpoint (attached or launched)."""

    def __init__(self, endpoint: Endpoint | None = None, *, launch: LaunchSpec | None = None,
                 tokenizer: str | None = None, alias: str = "reward", label_index: int = 0,
                 log_dir: str | Path | None = None, timeout_s: float = 300.0,
                 max_concurrency: int = 16) -> None:
        if (endpoint is None) == (launch is None):
            raise ValueError("VllmReward needs exactly one of endpoint (attach) or launch")
        self.endpoint = endpoint
        self.launch = pooling_spec(launch) if launch is not None else None
        self.alias, self.label_index = alias, label_index
        self._log_dir = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="toa-vllm-rm-"))
        self._tokenizer_path = tokenizer or self._local_model_dir()
        self._tokenizer: Any = None
        self._handle: Any = None  # ServerHandle when launched and started
        self._start_lock = threading.Lock()
        self._client: httpx.AsyncClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop _client belongs to
        self._max_concurrency = max_concurrency
        self._limit = asyncio.Semaphore(max_concurrency)
        self._timeout_s = timeout_s
        self._closed = False
        base = launched_identity(alias, self.launch) if self.launch else endpoint.identity
        self.identity = f"vllm:{base}" + (f":label={label_index}" if label_index else "")

    # ---- lifecycle ----------------------------------------------------------------------
    def _local_model_dir(self) -> str | None:
        if self.launch is None:
            return None
        from toa.servers.vllm import resolve_model_dir

        folder = Path(resolve_model_dir(self.launch.model))
        return str(folder) if folder.is_dir() else None

    def start(self) -> Endpoint:
        """The endpoint to score against, starting the launched server once (blocking)."""
        with self._start_lock:
            if self._closed:
                raise RuntimeError("VllmReward is closed")
            if self.endpoint is None:
                from toa.servers.vllm import start_vllm

                self._handle = start_vllm(self.alias, self.launch, self._log_dir)
                self.endpoint = self._handle.endpoint
            return self.endpoint

    async def aclose(self) -> None:
        client, self._client, self._loop = self._client, None, None
        if client is not None:
            await client.aclose()
        await asyncio.to_thread(self._stop_server)

    def close(self) -> None:
        """Stop a launched server (its whole process group) and drop the HTTP client."""
        client, self._client, self._loop = self._client, None, None
        if client is not None:
            try:  # inside a loop close it properly; outside, its loop is gone: just drop it
                asyncio.get_running_loop().create_task(client.aclose())
            except RuntimeError:
                pass
        self._stop_server()

    def _stop_server(self) -> None:
        with self._start_lock:
            self._closed = True
            if self._handle is not None:
                self._handle.stop()
                self._handle = None

    @property
    def log_path(self) -> Path | None:
        return self._handle.log_path if self._handle is not None else None

    # ---- scoring ------------------------------------------------------------------------
    async def score_batch(self, items: list[tuple[Prompt, str]]) -> list[Score]:
        if self._closed:
            raise RuntimeError("VllmReward is closed")
        endpoint = self.endpoint or await asyncio.to_thread(self.start)
        client = self._http(endpoint)
        if self._tokenizer_path is None:
            return list(await asyncio.gather(*(self._score_chat(client, endpoint, p, r)
                                               for p, r in items)))
        ids = await asyncio.to_thread(self._encode, items)
        return await self._score_ids(client, endpoint, ids)

    def _http(self, endpoint: Endpoint) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # an async client's connections belong to one event loop
            self._client, self._loop = None, loop
            self._limit = asyncio.Semaphore(self._max_concurrency)
        if self._client is None:
            # a proxy from the environment must not intercept a loopback server
            self._client = httpx.AsyncClient(
                timeout=self._timeout_s, trust_env=not _loopback(endpoint.base_url),
                headers={"Authorization": f"Bearer {endpoint.api_key.get_secret_value()}"})
        return self._client

    def _encode(self, items: list[tuple[Prompt, str]]) -> list[list[int]]:
        """Token ids of [user: prompt, assistant: response] under the model's chat template."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self._tokenizer_path)
        tok = self._tokenizer
        out = []
        for prompt, response in items:
            ids = tok.apply_chat_template(
                [{"role": "user", "content": prompt.text},
                 {"role": "assistant", "content": response}], tokenize=True)
            out.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
        return out

    async def _score_ids(self, client: httpx.AsyncClient, endpoint: Endpoint,
                         ids: list[list[int]]) -> list[Score]:
        """One /classify request for every item that fits the context; too long ones are errors."""
        limit = endpoint.max_model_len
        fits = [i for i, x in enumerate(ids) if limit is None or len(x) <= limit]
        scores: list[Score] = [
            Score(None, ERROR, f"input of {len(x)} tokens exceeds the server's max_model_len "
                  f"{limit}") for x in ids]
        if fits:
            body = {"input": [ids[i] for i in fits]}
            for i, score in zip(fits, await self._classify(client, endpoint, body, len(fits))):
                scores[i] = score
        return scores

    async def _score_chat(self, client: httpx.AsyncClient, endpoint: Endpoint,
                          prompt: Prompt, response: str) -> Score:
        body = {"messages": [{"role": "user", "content": prompt.text},
                             {"role": "assistant", "content": response}]}
        try:
            async with self._limit:
                return (await self._classify(client, endpoint, body, 1))[0]
        except Exception as exc:  # noqa: BLE001  (errors are data: this item only)
            return error_score(exc)

    async def _classify(self, client: httpx.AsyncClient, endpoint: Endpoint, body: dict,
                        n: int) -> list[Score]:
        """POST /classify with raw scores; a transport or HTTP failure raises (the service
        retries the batch, then records the error)."""
        root = endpoint.base_url.rstrip("/").removesuffix("/v1")
        resp = await client.post(f"{root}/classify",
                                 json={"model": endpoint.model, "use_activation": False, **body})
        if resp.status_code != 200:
            raise RuntimeError(f"/classify HTTP {resp.status_code}: {resp.text[:300]}")
        data = sorted(resp.json()["data"], key=lambda d: d["index"])
        if len(data) != n:
            raise ValueError(f"/classify returned {len(data)} results for {n} inputs")
        return [self._value(d) for d in data]

    def _value(self, datum: dict) -> Score:
        probs = datum.get("probs") or []
        if self.label_index >= len(probs):
            return Score(None, ERROR, f"/classify gave {len(probs)} outputs; "
                         f"label_index {self.label_index} is out of range")
        return Score(float(probs[self.label_index]), OK, None)


__all__ = ["POOLING_FLAGS", "VllmReward", "launched_identity", "pooling_spec"]
