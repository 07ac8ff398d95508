"""Seconds from `toa run` starting to its first model request, on attached servers, with the head
start (toa.head_start) and without it (`--set head_start=false`), in the same session.

    python benchmarks/first_request.py [--repeats 3] [--prompts 16]

A stub OpenAI-compatible server (a test double that answers at once, in its own process) writes
the wall time of the first chat request it receives; each `toa run` is a fresh process on a fresh
results root (Random, n=2, one agent, a free length reward), with one Prefect home for all runs
(a warm-up run first, so that no measured run pays Prefect's database set-up). The last line reads
    first request: <x> s with the head start, <y> s without (<ratio>); runs <a> s and <b> s
the goal being x <= 3 s (README, "Speed and memory").
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def stub(port: int, out: str) -> None:
    """Child process: answer chat requests at once; write the first one's arrival time to `out`."""
    from aiohttp import web

    seen = []

    async def chat(request):
        if not seen:
            seen.append(time.time())
            Path(out).write_text(repr(seen[0]))
        body = await request.json()
        n = body.get("n", 1)
        return web.json_response({"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                                  "choices": [{"index": i, "finish_reason": "stop",
                                               "message": {"role": "assistant", "content": f"reply {i}"}} for i in range(n)],
                                  "usage": {"prompt_tokens": 20, "completion_tokens": 8 * n}})

    async def models(request):
        return web.json_response({"object": "list", "data": [{"id": "stub", "object": "model"}]})

    app = web.Application()
    app.add_routes([web.post("/v1/chat/completions", chat), web.get("/v1/models", models)])
    web.run_app(app, host="127.0.0.1", port=port, print=None)


def length(prompt: str, response: str, reference: str | None) -> float:
    """The free reward (importable as first_request:length)."""
    return min(len(response or ""), 100) / 100


def one_run(tmp: Path, i: int, head_start: bool, prompts: int) -> tuple[float, float]:
    """(seconds to the first request, seconds of the whole run) of one fresh `toa run`."""
    from toa.servers.vllm import free_port

    port, first = free_port("127.0.0.1"), tmp / f"first-{i}.txt"
    server = subprocess.Popen([sys.executable, __file__, "stub", str(port), str(first)])
    try:
        _wait_for(f"http://127.0.0.1:{port}/v1/models", server)
        run_file = tmp / f"run-{i}.toml"
        run_file.write_text("\n".join([
            f'results_root = "{tmp / f"results-{i}"}"', 'methods = ["random"]', "n = 2",
            f"head_start = {str(head_start).lower()}", "[prompts]", f"limit = {prompts}",
            "[reward]", 'kind = "custom"', 'function = "first_request:length"',
            "[[agents]]", 'alias = "a"', "[agents.endpoint]", f'base_url = "http://127.0.0.1:{port}/v1"',
            'model = "stub"', 'api_key = "stub-key"']) + "\n")
        env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
        env |= {"PYTHONPATH": str(HERE), "PREFECT_HOME": str(tmp / "prefect")}
        start = time.time()
        done = subprocess.run([sys.executable, "-m", "toa.cli", "run", "--config", str(run_file), "--no-progress"],
                              env=env, capture_output=True, text=True)
        took = time.time() - start
        if done.returncode:
            raise RuntimeError(f"toa run failed ({done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
        return float(first.read_text()) - start, took
    finally:
        server.kill()
        server.wait()


def _wait_for(url: str, server: subprocess.Popen) -> None:
    import httpx

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError("the stub server exited")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)  # polling with a deadline
    raise RuntimeError("the stub server did not answer within 60 s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("cmd", nargs="*", help=argparse.SUPPRESS)  # "stub PORT FILE": the child process
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--prompts", type=int, default=16)
    args = p.parse_args()
    if args.cmd:
        return stub(int(args.cmd[1]), args.cmd[2])
    cpu = open("/proc/cpuinfo").read().split("model name")[1].split("\n")[0].strip(": \t") if Path("/proc/cpuinfo").exists() else "?"
    print(f"{cpu}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}; attached stub server, Random n=2, "
          f"{args.prompts} prompts, median of {args.repeats}")
    with tempfile.TemporaryDirectory(prefix="toa-first-") as tmp:
        one_run(Path(tmp), 0, True, args.prompts)  # warm-up: Prefect's database is created once
        times = {True: [], False: []}
        for r in range(args.repeats):
            for on in (True, False):  # alternated, so that drift on the machine hits both alike
                times[on].append(one_run(Path(tmp), 1 + 2 * r + on, on, args.prompts))
    (x, a), (y, b) = ([statistics.median(t[k] for t in times[on]) for k in (0, 1)] for on in (True, False))
    print(f"{'head start':>11} {'first request s':>16} {'run s':>7}")
    for label, first, run in (("on", x, a), ("off", y, b)):
        print(f"{label:>11} {first:>16.2f} {run:>7.1f}")
    print(f"first request: {x:.2f} s with the head start, {y:.2f} s without ({x / y:.2f}); runs {a:.1f} s and {b:.1f} s")


if __name__ == "__main__":
    main()
