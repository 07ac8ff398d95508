"""Model servers: launch vLLM (CPU build by default, CUDA when a GPU is present), attach to
servers that already run, and the embedded models shipped in PyPI packages. Everything here is
plain Python: the Prefect tasks that manage server lifetimes live elsewhere."""

from toa.servers.attach import attach
from toa.servers.embedded import EMBEDDED_MODELS, ensure_embedded_model
from toa.servers.spec import AttachSpec, Endpoint, LaunchSpec
from toa.servers.vllm import ServerHandle, ServerStartError, ensure_vllm_cpu_venv, start_vllm

__all__ = [
    "EMBEDDED_MODELS",
    "AttachSpec",
    "Endpoint",
    "LaunchSpec",
    "ServerHandle",
    "ServerStartError",
    "attach",
    "ensure_embedded_model",
    "ensure_vllm_cpu_venv",
    "start_vllm",
]
