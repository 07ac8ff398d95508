"""What this machine can do for a launched model server: the CPU's instruction sets, the cores
this process may use, memory, GPUs; and the two decisions toa takes from them.

- dtype "auto" on CPU: bfloat16 only where the CPU computes it natively (x86: AVX512_BF16 or
  AMX_BF16; aarch64: the BF16 feature), float32 otherwise. On a CPU without native bf16, vLLM CPU
  in bfloat16 was seen to crawl or stall (AMD EPYC, AVX2: 16 requests x n=2 x 128 tokens timed
  out after 271 s; float32 served them in 29 s). On GPU "auto" stays vLLM's own choice.
- cores: several CPU servers on one machine get disjoint core sets (vLLM's
  VLLM_CPU_OMP_THREADS_BIND), because vLLM's automatic binding puts every server's worker on the
  same first core. A few cores are kept back for the orchestrator on big machines.

Everything reads /proc (Linux) and falls back to "unknown" elsewhere; the pure functions take
their inputs as arguments so tests can feed them any CPU.
"""

from __future__ import annotations

import functools
import os
import platform
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

# Flags that matter for vLLM CPU speed, in the order `toa doctor` prints them.
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_vnni", "bf16", "asimd", "sve")
_NATIVE_BF16 = {"x86_64": ("avx512_bf16", "amx_bf16"), "aarch64": ("bf16",)}


@dataclass(frozen=True)
class CpuInfo:
    model: str
    arch: str
    flags: frozenset[str] = field(default_factory=frozenset)
    cores: tuple[int, ...] = ()  # CPU ids this process may run on

    @property
    def native_bf16(self) -> bool:
        return native_bf16(self.flags, self.arch)

    @property
    def isa(self) -> list[str]:
        return [f for f in ISA_FLAGS if f in self.flags]


def native_bf16(flags: frozenset[str] | set[str], arch: str) -> bool:
    """Whether the CPU computes bfloat16 in hardware (not emulated through float32)."""
    return any(f in flags for f in _NATIVE_BF16.get(arch, ()))


def cpu_dtype(info: CpuInfo) -> str:
    """The dtype "auto" means for a vLLM CPU server on this CPU."""
    return "bfloat16" if info.native_bf16 else "float32"


@functools.lru_cache(maxsize=1)
def cpu_info() -> CpuInfo:
    """This machine's CPU, read once per process."""
    model, flags = "unknown CPU", frozenset()
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "cpu model", "hardware") and model == "unknown CPU":
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = frozenset(value.split())
    return CpuInfo(model=model, arch=platform.machine(), flags=flags, cores=allowed_cores())


def allowed_cores() -> tuple[int, ...]:
    try:
        return tuple(sorted(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return tuple(range(os.cpu_count() or 1))


def memory_gib() -> tuple[float | None, float | None]:
    """(total, available) GiB from /proc/meminfo; None where unknown."""
    found: dict[str, float] = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("MemTotal", "MemAvailable"):
                found[key] = int(value.split()[0]) / 2**20  # kB -> GiB
    except (OSError, ValueError, IndexError):
        pass
    return found.get("MemTotal"), found.get("MemAvailable")


@functools.lru_cache(maxsize=1)
def gpus() -> tuple[str, ...]:
    """GPU names from `nvidia-smi -L` (empty without a working one). Asking torch would cost
    seconds and torch may not be installed in this environment at all."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return ()
    try:
        out = subprocess.run([exe, "-L"], check=False, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return ()
    if out.returncode != 0:
        return ()
    return tuple(line.strip() for line in out.stdout.splitlines() if line.startswith("GPU"))


def reserved_for_orchestrator(cores: int, servers: int) -> int:
    """Cores left unbound for toa itself (its event loop, the reward model, the Prefect API):
    one in eight, but never so many that a server would get none. On a 2-core box with two
    servers that is zero: each server gets one core and the orchestrator shares them."""
    return max(0, min(cores // 8, cores - servers))


def partition_cores(cores: list[int] | tuple[int, ...], servers: int) -> list[list[int]]:
    """Disjoint, contiguous core sets, one per server, after keeping the orchestrator's share
    back (the last cores). With more servers than cores, sets cannot be disjoint: servers take
    single cores round-robin, which is still better than all on the first core."""
    if servers <= 0:
        return []
    cores = sorted(cores)
    if servers > len(cores):
        return [[cores[i % len(cores)]] for i in range(servers)]
    usable = cores[:len(cores) - reserved_for_orchestrator(len(cores), servers)]
    size, extra = divmod(len(usable), servers)
    out, start = [], 0
    for i in range(servers):
        end = start + size + (1 if i < extra else 0)
        out.append(usable[start:end])
        start = end
    return out


def omp_bind(cpus: list[int], ranks: int = 1) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for a server on `cpus`: one list per tensor-parallel rank,
    separated by '|' (vLLM's syntax), each a comma list of CPU ids."""
    ranks = max(1, min(ranks, len(cpus)))
    size = len(cpus) // ranks
    parts = [cpus[i * size:(i + 1) * size] if i < ranks - 1 else cpus[i * size:] for i in range(ranks)]
    return "|".join(",".join(str(c) for c in part) for part in parts)


def likely_causes(endpoint) -> str:
    """What to check when a server is slow or stalled, most likely first, from how it was
    launched (toa.servers.spec.Endpoint; attached servers run on hardware toa does not see)."""
    if endpoint.device is None:
        return "the server's own hardware and load (toa did not launch it)"
    causes = []
    info = cpu_info()
    if endpoint.device == "cpu" and endpoint.dtype == "bfloat16" and not info.native_bf16:
        causes.append(f"dtype bfloat16 on a CPU without native bf16 ({info.model}): set launch.dtype = \"float32\"")
    if endpoint.device == "cpu":
        cpus = list(endpoint.cpus or info.cores)
        causes.append(f"cores: bound to CPU {','.join(map(str, cpus))} ({len(cpus)} of {len(info.cores)}); "
                      "give it more with launch.cpus, or launch fewer servers on this machine")
    total, available = memory_gib()
    if available is not None:
        causes.append(f"memory: {available:.1f} GiB available of {total:.1f} GiB "
                      "(launch.cpu_kvcache_gib, launch.max_model_len)")
    return "; ".join(causes) or "unknown"
