"""Regenerate benchmarks/RESULTS.md: every benchmark, at a size this machine allows, in one go.

    python benchmarks/run_all.py [--quick] [--only NAME ...] [--out benchmarks/RESULTS.md]

Each benchmark runs in its own process, one after the other (they would compete for the same
cores), and its output goes into RESULTS.md under the CPU model and the date it ran on. Each
section starts with the benchmark's summary line (its ratios), then the whole output. --quick
runs smaller sizes (minutes, for a check; the figures of record come from a full run). A
benchmark that fails is reported as failed with its error, and the others still run. --only
reruns some and keeps the others' sections as they were (each names its own date). A benchmark
in ON_REQUEST (hours long) runs only when --only names it; other runs keep its section.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# name -> (script arguments, quick arguments, the prefix of its summary line, what it measures)
BENCHMARKS = {
    "orchestrator": (["orchestrator.py", "--calls", "2000", "10000", "100000"],
                     ["orchestrator.py", "--calls", "2000", "10000"], "orchestrator:",
                     "CPU per model call of the `toa` flow against a stub server, next to a minimal raw client"),
    "throughput": (["throughput.py", "--prompts", "64", "--toa-prompts", "128", "--dtype", "float32",
                    "--memory", "10000"],
                   ["throughput.py", "--prompts", "32", "--toa-prompts", "32", "--dtype", "float32", "--memory"],
                   "c/d", "toa against the raw client on one vLLM CPU server (float32), prefix-cache hits per phase"),
    "toa_parallel": (["toa_parallel.py", "--prompts", "16"], ["toa_parallel.py", "--prompts", "4"], "toa_parallel:",
                     "TOA with several simulations of a tree in flight against sequential TOA, same budget"),
    "store_scale": (["store_scale.py"], ["store_scale.py", "--rows", "1000000"], "store_scale:",
                    "writing and querying the results store at 10 million samples"),
    "reward_batching": (["reward_batching.py"], ["reward_batching.py", "--n", "64"], "",
                        "reward model throughput, micro-batched against one at a time"),
    "first_request": (["first_request.py", "--repeats", "3"], ["first_request.py", "--repeats", "1"], "first request:",
                      "seconds from `toa run` starting to its first model request on attached servers, with the "
                      "head start and without"),
    "search_efficiency": (["search_efficiency.py"], ["search_efficiency.py", "--prompts", "50", "--boot", "500"],
                          "toa reaches",
                          "every sampling method on a simulated world of four differing agents: generations to reach "
                          "Random best-of-32's reward, and best reward at 32 (no model; the paper's efficiency claim)"),
    "search_efficiency_real": (["search_efficiency.py", "--real"], ["search_efficiency.py", "--real"], "toa reaches",
                               "the same comparison on the embedded default (two small models on vLLM CPU servers, "
                               "64 AlpacaEval prompts, the default reward) through the `toa` flow; hours on two cores, "
                               "so only with --only (resumable: see its --real-root)"),
    "crash_points": (["crash_points.py"], ["crash_points.py"], "crash points:",
                     "kill -9 of `toa run`, `toa export`, `toa report` and `toa evolve` at seeded points over every "
                     "phase, each followed by a rerun: calls in flight, calls repeated, rows lost, duplicates"),
}
ON_REQUEST = {"search_efficiency_real"}  # run by --only alone; a full run keeps its section


def cpu_line() -> str:
    model = "unknown CPU"
    flags: set[str] = set()
    if Path("/proc/cpuinfo").exists():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model == "unknown CPU":
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    isa = [name for name, flag in (("AVX-512", "avx512f"), ("AMX", "amx_tile"), ("AVX2", "avx2")) if flag in flags]
    return f"{model} ({', '.join(isa) or 'no AVX2'}), {os.cpu_count()} cores, {platform.machine()}"


def run_one(name: str, args: list[str]) -> tuple[str, str, float, int]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, *args], cwd=HERE, capture_output=True, text=True)
    output = proc.stdout + (f"\n[stderr, last lines]\n{proc.stderr[-3000:]}" if proc.returncode else "")
    return name, output, time.perf_counter() - start, proc.returncode


def summary(output: str, prefix: str) -> str:
    lines = [x for x in output.splitlines() if x.strip()]
    marked = [x for x in lines if prefix and x.startswith(prefix)]
    return (marked or lines or ["(no output)"])[-1]


def section(name: str, output: str, seconds: float, code: int, cpu: str) -> str:
    _, _, prefix, what = BENCHMARKS[name]
    head = f"## {name} (`benchmarks/{BENCHMARKS[name][0][0]}`)\n{what}.\n\n{time.strftime('%Y-%m-%d')}, {cpu}; took {seconds:.0f} s.\n\n"
    if code:
        return head + f"**Failed** (exit {code}):\n\n```\n{output.strip()[-4000:]}\n```\n"
    return head + f"**{summary(output, prefix)}**\n\n```\n{output.strip()}\n```\n"


def previous_sections(path: Path) -> dict[str, str]:
    """{benchmark name: its section} of an existing RESULTS.md (each section starts "## <name> (")."""
    if not path.exists():
        return {}
    chunks = path.read_text().split("\n## ")[1:]
    return {chunk.split(" ", 1)[0]: "## " + chunk.rstrip("\n") + "\n" for chunk in chunks}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller sizes, for a check")
    p.add_argument("--only", nargs="*", choices=list(BENCHMARKS),
                   help="run these only; the others keep their sections (with their own dates) from --out")
    p.add_argument("--out", default=str(HERE / "RESULTS.md"))
    args = p.parse_args()
    cpu = cpu_line()
    parts = [f"# Benchmark results\n\nRegenerated by `python benchmarks/run_all.py{' --quick' if args.quick else ''}` "
             f"on {time.strftime('%Y-%m-%d')}: {cpu}. Ratios come first; absolute figures are only good for "
             "this CPU.\n"]
    kept = previous_sections(Path(args.out))
    sections = {name: kept[name] for name in BENCHMARKS if name in kept and (args.only or name in ON_REQUEST)}
    for name in args.only or [n for n in BENCHMARKS if n not in ON_REQUEST]:
        full, quick, *_ = BENCHMARKS[name]
        print(f"running {name} ...", flush=True)
        _, output, seconds, code = run_one(name, quick if args.quick else full)
        print(f"  {name}: {'failed' if code else 'done'} in {seconds:.0f} s: {summary(output, BENCHMARKS[name][2])}", flush=True)
        sections[name] = section(name, output, seconds, code, cpu)
        ordered = [sections[n] for n in BENCHMARKS if n in sections]
        Path(args.out).write_text("\n".join(parts + ordered))  # after each one: a stop keeps what ran
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
