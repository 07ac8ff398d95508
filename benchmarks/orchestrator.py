"""Orchestrator CPU per model call: the real `toa` flow against a stub server, next to the floor
(a minimal raw async HTTP client sending the same calls), each in a process of its own.

    python benchmarks/orchestrator.py [--calls 2000 10000 100000] [--batch-size 1000]
                                      [--concurrency 64] [--profile DIR]

For each call count N: a stub OpenAI-compatible server (throughput.py's `stub`, a test double
that answers at once, in its own process: its CPU is not counted) serves
  floor: N chat requests over keep-alive connections written by hand on asyncio streams, the
         bodies parsed with json; what any client must at least spend;
  toa:   the `toa` flow, Random with n=1 over N synthetic prompts, one agent, batches of
         --batch-size, the free length reward, on a temporary Prefect API (throughput.py's
         memory-one does the same for memory). Everything the flow does counts: prompt loading,
         tasks, the call record, rewards, samples, datasets, report. The Prefect API is the
         temporary one `toa run` starts (toa.servers.prefect_api), a process of its own.
CPU is user + sys of the measuring process from start to exit (imports included), read with
getrusage; the temporary Prefect API server is a separate process, reported on its own line.
The last line reads
    orchestrator: <x> ms CPU per call (floor <y> ms; <calls> calls, <wall> s)
for the largest N, the goal being x <= 1.0 at 10k calls (README, "Speed and memory").
--profile DIR writes a cProfile of each toa process there (toa-<N>.prof).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import throughput  # noqa: E402  (benchmarks/throughput.py: the stub server, prompts, the flow call)


def cpu_seconds(who: int = resource.RUSAGE_SELF) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


# ---------------------------------------------------------------------------- the floor
async def _floor(url: str, calls: int, concurrency: int) -> None:
    """`calls` chat requests on `concurrency` keep-alive connections: HTTP/1.1 by hand."""
    host, port = url.split("//")[1].split("/")[0].split(":")
    path = "/" + url.split("//")[1].split("/", 1)[1] + "/chat/completions"
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(calls):
        queue.put_nowait(i)

    async def connection() -> None:
        reader, writer = await asyncio.open_connection(host, int(port))
        while not queue.empty():
            i = queue.get_nowait()
            body = json.dumps({"model": "stub", "n": 1, "temperature": 0.7, "max_tokens": 8, "seed": i,
                               "messages": [{"role": "user", "content": f"Question {i}: explain item {i}."}]}).encode()
            writer.write(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                         f"Authorization: Bearer stub-key\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
            reply = json.loads(await reader.readexactly(length))
            assert reply["choices"][0]["message"]["content"]
        writer.close()

    await asyncio.gather(*(connection() for _ in range(concurrency)))


def floor_child(url: str, calls: int, concurrency: int) -> None:
    start = time.perf_counter()
    asyncio.run(_floor(url, calls, concurrency))
    print(json.dumps({"cpu_s": cpu_seconds(), "wall_s": time.perf_counter() - start}))


# ---------------------------------------------------------------------------- toa
def toa_child(url: str, calls: int, batch_size: int, concurrency: int, profile: str | None) -> None:
    os.environ["TOA_BENCH_KEY"] = "stub-key"
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["PREFECT_HOME"] = str(Path(tmp) / "prefect")  # read when Prefect is first imported
        from toa.servers.prefect_api import temporary_api  # the API `toa run` starts: a process of its own

        api = temporary_api(Path(tmp) / "logs")
        api.__enter__()
        texts = [f"Question {i}: explain item {i} of the catalogue in one sentence." for i in range(calls)]
        prompts = throughput.write_prompts(texts, Path(tmp) / "prompts.jsonl")
        agents = throughput.agents_for(url, "stub", "TOA_BENCH_KEY", ["stub"], {"temperature": 0.7, "max_tokens": 8},
                                       concurrency)
        reward = {"kind": "custom", "function": throughput.REWARD_FN}
        cpu_before = cpu_seconds()
        profiler = None
        if profile:
            import cProfile
            profiler = cProfile.Profile()
            profiler.enable()
        _, wall, result = throughput.run_flow(Path(tmp) / "results", prompts, agents, "random", 1, batch_size, reward)
        if profiler:
            profiler.disable()
            profiler.dump_stats(profile)
        flow_cpu = cpu_seconds() - cpu_before
        samples = result["datasets"]["random"]["sft"]
        api.__exit__(None, None, None)
    api_cpu = cpu_seconds(resource.RUSAGE_CHILDREN)  # the temporary API server, ended with the harness
    print(json.dumps({"cpu_s": cpu_seconds(), "flow_cpu_s": flow_cpu, "wall_s": wall, "api_cpu_s": api_cpu,
                      "sft_rows": samples}))


# ---------------------------------------------------------------------------- driver
def _child(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    line = next((x for x in reversed(out.stdout.splitlines()) if x.startswith("{")), None)
    if out.returncode or line is None:
        raise RuntimeError(f"{args[0]} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(line)


def measure(calls: int, batch_size: int, concurrency: int, profile_dir: str | None) -> tuple[dict, dict]:
    proc, url = throughput.start_stub()
    try:
        floor = _child("floor", "--url", url, "--calls", str(calls), "--concurrency", str(concurrency))
        profile = ["--profile", str(Path(profile_dir) / f"toa-{calls}.prof")] if profile_dir else []
        toa = _child("toa", "--url", url, "--calls", str(calls), "--batch-size", str(batch_size),
                     "--concurrency", str(concurrency), *profile)
    finally:
        proc.kill()
        proc.wait()
    if toa["sft_rows"] != calls:
        raise RuntimeError(f"the flow made {toa['sft_rows']} SFT rows for {calls} prompts")
    return floor, toa


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd")
    for name in ("floor", "toa"):
        s = sub.add_parser(name)
        s.add_argument("--url", required=True)
        s.add_argument("--calls", type=int, required=True)
        s.add_argument("--concurrency", type=int, default=64)
        s.add_argument("--batch-size", type=int, default=1000)
        s.add_argument("--profile")
    p.add_argument("--calls", type=int, nargs="+", default=[2_000, 10_000, 100_000])
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--concurrency", type=int, default=64, help="requests in flight (floor) = agent max_concurrency (toa)")
    p.add_argument("--profile", help="folder for a cProfile of each toa process")
    args = p.parse_args()
    if args.cmd == "floor":
        return floor_child(args.url, args.calls, args.concurrency)
    if args.cmd == "toa":
        return toa_child(args.url, args.calls, args.batch_size, args.concurrency, args.profile)
    cpu = open("/proc/cpuinfo").read().split("model name")[1].split("\n")[0].strip(": \t") if Path("/proc/cpuinfo").exists() else "?"
    print(f"{cpu}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}; Random n=1, batches of {args.batch_size}, "
          f"{args.concurrency} in flight, stub server")
    print(f"{'calls':>8} {'toa ms/call':>12} {'flow only':>10} {'floor ms/call':>14} {'toa/floor':>10} {'toa wall s':>11} {'api ms/call':>12}")
    for calls in args.calls:
        floor, toa = measure(calls, args.batch_size, args.concurrency, args.profile)
        x, y = 1000 * toa["cpu_s"] / calls, 1000 * floor["cpu_s"] / calls
        print(f"{calls:>8} {x:>12.3f} {1000 * toa['flow_cpu_s'] / calls:>10.3f} {y:>14.3f} {x / y:>10.1f} "
              f"{toa['wall_s']:>11.1f} {1000 * toa['api_cpu_s'] / calls:>12.3f}", flush=True)
    print(f"orchestrator: {x:.2f} ms CPU per call (floor {y:.2f} ms; {calls} calls, {toa['wall_s']:.1f} s)")


if __name__ == "__main__":
    main()
