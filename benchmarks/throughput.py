"""Throughput of toa against the raw server, in one run on one server (targets b/a >= 0.95,
c/d >= 0.90 (TOA against the raw client replaying the same requests), rerun <= 2 % of
the first run, orchestrator memory flat in the prompt count).

    python benchmarks/throughput.py [--prompts 64] [--n 4] [--max-tokens 64] [--concurrency 32]
                                    [--model embedded:smollm2-135m-instruct] [--memory 10000 100000]

One vLLM server (started here, or --base-url/--model-name/--api-key-env to attach) serves:
  (a) raw:  an AsyncOpenAI client hammering it with the request mix toa's Random sends (one
            request per prompt, n=N, same sampling, --concurrency requests in flight), measured
            without and with token logprobs (toa asks for them: exact per-choice token counts);
  (b) toa random: the `toa` flow (real Prefect API, Parquet record) on the same prompts and N;
  (c) toa toa: the flow's TOA method (MCTS over two aliases of the same server, width 2) with all
            prompts of a batch in flight; the two aliases, one endpoint, share its --concurrency
            limit, so the server never sees more requests in flight than the raw client sends;
  (d) replay: the raw client sending the exact requests (c) recorded (its longer refinement
            prompts, n=1 each), all at once, --concurrency in flight: the best the server does on
            TOA's request mix without TOA's dependencies (a tree's step waits for its parent), so
            c/d is the orchestrator's own efficiency and d/a the cost of the mix itself;
then (b) again on its finished results (the rerun). Throughput is completion tokens per second of
wall time (the flow's whole call for (b)/(c): prompt loading, tasks, writes, datasets, report).
Rewards use a trivial custom function so the numbers are the orchestrator's, not a reward
model's competing for the same CPU (pass --reward similarity to include the embedded reward).

--memory N...: for each N, a fresh process runs the flow (Random, n=1, one agent) over N
synthetic prompts against a stub OpenAI server (`stub` subcommand, a test double that answers
at once: the point is the orchestrator) and prints its peak RSS; flat means streaming works.
Prompts come from AlpacaEval (../shared/data) when present, else the packaged default set.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
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
ALPACA = HERE.parents[1] / "shared" / "data" / "alpaca_eval_805.jsonl"
REWARD_FN = "throughput:length_reward"  # importable once HERE is on sys.path (below)


def length_reward(prompt: str, response: str, reference: str | None) -> float:
    """A free reward (response length, capped): real numbers, no model on the benchmark's CPU."""
    return min(len(response), 500) / 500


# ---------------------------------------------------------------------------- prompts
def load_prompts(count: int) -> list[str]:
    if ALPACA.exists():
        rows = [json.loads(line)["instruction"] for line in ALPACA.read_text().splitlines() if line.strip()]
    else:
        from toa.prompts import DEFAULT_PROMPTS
        rows = [json.loads(line)["prompt"] for line in Path(DEFAULT_PROMPTS).read_text().splitlines() if line.strip()]
    return [rows[i % len(rows)] + ("" if i < len(rows) else f" (variant {i // len(rows)})") for i in range(count)]


def write_prompts(texts: list[str], path: Path) -> Path:
    with path.open("w") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"id": f"p{i}", "prompt": t}) + "\n")
    return path


# ---------------------------------------------------------------------------- (a) raw client
async def raw_client(base_url: str, model: str, key: str, prompts: list[str], n: int, sampling: dict,
                     concurrency: int, logprobs: bool) -> tuple[int, float]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base_url, api_key=key, timeout=600, max_retries=0)
    limit = asyncio.Semaphore(concurrency)

    async def one(i: int, text: str) -> int:
        async with limit:
            resp = await client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": text}], n=n, seed=1000 + i,
                logprobs=logprobs or None, **sampling)
            return resp.usage.completion_tokens

    start = time.perf_counter()
    tokens = await asyncio.gather(*(one(i, t) for i, t in enumerate(prompts)))
    elapsed = time.perf_counter() - start
    await client.close()
    return sum(tokens), elapsed


async def replay_requests(base_url: str, model: str, key: str, root: Path, concurrency: int) -> tuple[int, float]:
    """(d): the recorded requests of a run, re-sent by the raw client as fast as it allows, in
    the order the run sent them (a call went out latency_s before it was recorded)."""
    import polars as pl
    from openai import AsyncOpenAI

    from toa.storage import Store

    calls = (Store(str(root)).read("calls").unique("call_key", keep="first")
             .sort(pl.col("created_at") - pl.col("latency_s")))
    requests = [(json.loads(r["request_json"]), r["seed"]) for r in calls.iter_rows(named=True)]
    client = AsyncOpenAI(base_url=base_url, api_key=key, timeout=600, max_retries=0)
    limit = asyncio.Semaphore(concurrency)

    async def one(request: dict, seed: int) -> int:
        async with limit:
            resp = await client.chat.completions.create(model=model, seed=seed, **request)
            return resp.usage.completion_tokens

    start = time.perf_counter()
    tokens = await asyncio.gather(*(one(r, seed) for r, seed in requests))
    elapsed = time.perf_counter() - start
    await client.close()
    return sum(tokens), elapsed


# ---------------------------------------------------------------------------- (b), (c) the flow
def agents_for(base_url: str, model: str, key_env: str, aliases: list[str], sampling: dict, concurrency: int) -> list[dict]:
    # Aliases of one server differ in temperature by a hair so each is its own agent; being one
    # endpoint they share one limit of `concurrency` (toa.engine.make_clients), so the server
    # sees the raw client's load. A fixed in-flight limit, as the raw client has: the adaptive
    # one (on by default for attached endpoints, toa.aimd) starts at 8 and would measure its
    # ramp, not the orchestration.
    return [{"alias": a, "endpoint": {"base_url": base_url, "model": model, "api_key_env": key_env},
             "sampling": {**sampling, "temperature": sampling["temperature"] + 0.01 * i},
             "max_concurrency": concurrency, "adaptive_concurrency": False} for i, a in enumerate(aliases)]


def underfed_share(root: Path, concurrency: int) -> float:
    """The share of a run's span during which fewer than `concurrency` requests were wanted
    (sent or waiting for a slot): a call wants one from (created_at - latency_s) to created_at.
    What is left of TOA's dependencies (a tree's step waits for its parent) once the limit is
    shared: the tail of the run, where fewer trees than slots are left."""
    from toa.storage import Store

    calls = Store(str(root)).read("calls")
    events = sorted([(end - latency, 1) for end, latency in zip(calls["created_at"], calls["latency_s"])]
                    + [(end, -1) for end in calls["created_at"]])
    wanted, under, last = 0, 0.0, events[0][0]
    for at, step in events:
        if wanted < concurrency:
            under += at - last
        wanted, last = wanted + step, at
    return under / (events[-1][0] - events[0][0])


def run_flow(root: Path, prompts_file: Path, agents: list[dict], method: str, n: int, batch_size: int,
             reward: dict, options: dict | None = None) -> tuple[int, float, dict]:
    """Wall time of one `toa` flow call and the completion tokens it generated (new calls only)."""
    from toa.flows.synthesize import toa

    from toa.storage import Store

    overrides = {"agents": agents, "reward": reward, "batch_size": batch_size, "prompt_concurrency": 256,
                 "prompts": {"path": str(prompts_file)}, "method_options": {method: options or {}}}
    start = time.perf_counter()
    result = toa(methods=[method], n=n, results_root=str(root), overrides=overrides)
    elapsed = time.perf_counter() - start
    calls = Store(str(root)).read("calls")
    made = calls.filter(calls["created_at"] >= time.time() - elapsed - 1)
    return int(made["completion_tokens"].sum() or 0), elapsed, result


# ---------------------------------------------------------------------------- prefix cache
def cache_counters(base_url: str, key: str) -> tuple[float, float]:
    """The server's prefix-cache counters (tokens queried, tokens hit) from its /metrics."""
    import httpx

    from toa.servers.watch import parse_metrics

    resp = httpx.get(base_url.removesuffix("/v1") + "/metrics", headers={"Authorization": f"Bearer {key}"}, timeout=10)
    load = parse_metrics(resp.text) if resp.status_code == 200 else None
    return (load.cache_queries, load.cache_hits) if load else (0.0, 0.0)


def hit_rate(before: tuple[float, float], after: tuple[float, float]) -> float | None:
    queried = after[0] - before[0]
    return (after[1] - before[1]) / queried if queried else None


# ---------------------------------------------------------------------------- stub server (memory)
def serve_stub(port: int) -> None:
    """A test double of an OpenAI chat server that answers at once with a fixed short reply."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def chat(request):
        body = await request.json()
        n = body.get("n", 1)
        lp = {"content": [{"token": "ok", "logprob": -0.5, "top_logprobs": []}] * 8} if body.get("logprobs") else None
        choices = [{"index": i, "finish_reason": "stop", "logprobs": lp,
                    "message": {"role": "assistant", "content": f"stub reply {i} to a prompt of {len(str(body))} chars"}}
                   for i in range(n)]
        return JSONResponse({"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                             "choices": choices, "usage": {"prompt_tokens": 20, "completion_tokens": 8 * n, "total_tokens": 0}})

    async def models(request):
        return JSONResponse({"object": "list", "data": [{"id": "stub", "object": "model"}]})

    app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"]), Route("/v1/models", models)])
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def start_stub() -> tuple[subprocess.Popen, str]:
    import httpx

    from toa.servers.vllm import free_port

    port = free_port("127.0.0.1")
    proc = subprocess.Popen([sys.executable, __file__, "stub", "--port", str(port)])
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/models", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError("stub server exited")
        time.sleep(0.2)  # polling with a deadline
    proc.kill()
    raise RuntimeError("stub server did not answer within 60 s")


def memory_one(count: int, batch_size: int) -> None:
    """Child process: the flow over `count` synthetic prompts against the stub; prints JSON."""
    from prefect.testing.utilities import prefect_test_harness

    proc, url = start_stub()
    os.environ["TOA_BENCH_KEY"] = "stub-key"
    try:
        with tempfile.TemporaryDirectory() as tmp, prefect_test_harness(server_startup_timeout=120):
            texts = [f"Question {i}: explain item {i} of the catalogue in one sentence." for i in range(count)]
            prompts = write_prompts(texts, Path(tmp) / "prompts.jsonl")
            agents = agents_for(url, "stub", "TOA_BENCH_KEY", ["stub"], {"temperature": 0.7, "max_tokens": 8}, 64)
            rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            tokens, seconds, result = run_flow(Path(tmp) / "results", prompts, agents, "random", 1, batch_size,
                                               {"kind": "custom", "function": REWARD_FN})
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            print(json.dumps({"prompts": count, "seconds": round(seconds, 1), "peak_rss_mib": round(peak / 1024, 1),
                              "rss_before_flow_mib": round(rss_before / 1024, 1),
                              "sft_rows": result["datasets"].get("random", {}).get("sft")}))
    finally:
        proc.kill()


# ---------------------------------------------------------------------------- main
def benchmark(args) -> None:
    from prefect.testing.utilities import prefect_test_harness

    from toa.servers import LaunchSpec, start_vllm

    sampling = {"temperature": 0.7, "top_p": 1.0, "max_tokens": args.max_tokens}
    prompts = load_prompts(args.prompts)
    work = Path(tempfile.mkdtemp(prefix="toa-bench-"))
    handle = None
    if args.base_url:
        base_url, model, key = args.base_url, args.model_name, os.environ[args.api_key_env]
    else:
        t0 = time.perf_counter()
        handle = start_vllm("bench", LaunchSpec(model=args.model, dtype=args.dtype), work / "logs")
        print(f"server {args.model} up in {time.perf_counter() - t0:.0f} s")
        ep = handle.endpoint
        base_url, model, key = ep.base_url, ep.model, ep.api_key.get_secret_value()
    os.environ["TOA_BENCH_KEY"] = key
    reward = {"kind": "custom", "function": REWARD_FN} if args.reward == "custom" else {"kind": args.reward}
    prompts_file = write_prompts(prompts, work / "prompts.jsonl")
    N = args.n
    rows = []
    try:
        asyncio.run(raw_client(base_url, model, key, prompts[:8], 1, sampling, 8, False))  # warm-up
        hits = {}  # phase -> prefix-cache hit rate on the server during it

        def phase(label, fn):
            before = cache_counters(base_url, key)
            out = fn()
            hits[label] = hit_rate(before, cache_counters(base_url, key))
            return out

        with prefect_test_harness(server_startup_timeout=120):
            raw = phase("(a) raw client", lambda: asyncio.run(raw_client(base_url, model, key, prompts, N, sampling, args.concurrency, False)))
            raw_lp = phase("(a') raw client + logprobs", lambda: asyncio.run(raw_client(base_url, model, key, prompts, N, sampling, args.concurrency, True)))
            one = agents_for(base_url, model, "TOA_BENCH_KEY", ["a"], sampling, args.concurrency)
            two = agents_for(base_url, model, "TOA_BENCH_KEY", ["a", "b"], sampling, args.concurrency)
            rnd = phase("(b) toa random", lambda: run_flow(work / "random", prompts_file, one, "random", N, args.batch_size, reward))
            rerun = run_flow(work / "random", prompts_file, one, "random", N, args.batch_size, reward)
            toa_file = write_prompts(load_prompts(args.toa_prompts), work / "toa_prompts.jsonl")
            tree = phase("(c) toa toa", lambda: run_flow(work / "toa", toa_file, two, "toa", N // 2, args.toa_prompts, reward, {"width": 2}))
            underfed = underfed_share(work / "toa", args.concurrency)
            replay = phase("(d) raw replay of (c)'s requests", lambda: asyncio.run(replay_requests(base_url, model, key, work / "toa", args.concurrency)))
    finally:
        if handle is not None:
            handle.stop()
    a = raw[0] / raw[1]
    for label, (tokens, seconds, *_) in [("(a) raw client", raw), ("(a') raw client + logprobs", raw_lp),
                                          ("(b) toa random", rnd), ("(c) toa toa", tree),
                                          ("(d) raw replay of (c)'s requests", replay)]:
        rows.append((label, tokens, seconds, tokens / seconds, tokens / seconds / a))
    print(f"\n{platform.node()} {platform.machine()} {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}; "
          f"{args.prompts} prompts, N={N} per prompt, max_tokens={args.max_tokens}, {args.concurrency} requests in flight, "
          f"reward={args.reward}")
    print(f"{'':30} {'tokens':>8} {'seconds':>8} {'tok/s':>8} {'vs (a)':>7} {'prefix hits':>12}")
    for label, tokens, seconds, tps, ratio in rows:
        rate = hits.get(label)
        print(f"{label:30} {tokens:>8} {seconds:>8.1f} {tps:>8.1f} {ratio:>7.3f} {'n/a' if rate is None else f'{rate:.1%}':>12}")
    print(f"c/d (TOA against the raw client replaying its requests, goal >= 0.90): "
          f"{tree[0] / tree[1] / (replay[0] / replay[1]):.3f}; TOA: {args.toa_prompts} prompts, n={N // 2} x 2 agents, "
          f"width 2, {args.concurrency} in flight in all")
    print(f"(c) wanted fewer than {args.concurrency} requests in flight for {underfed:.1%} of its calls' span")
    print(f"rerun of the finished random run: {rerun[1]:.2f} s = {rerun[1] / rnd[1]:.1%} of the first run "
          f"({rerun[0]} new tokens)")
    for count in args.memory:
        out = subprocess.run([sys.executable, __file__, "memory-one", "--count", str(count),
                              "--batch-size", str(args.memory_batch_size)], capture_output=True, text=True)
        line = next((x for x in out.stdout.splitlines() if x.startswith("{")), None)
        print(f"memory, {count} prompts: {line or out.stderr[-2000:]}")


def main() -> None:
    sys.path.insert(0, str(HERE))  # the custom reward's module
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd")
    s = sub.add_parser("stub")
    s.add_argument("--port", type=int, required=True)
    m = sub.add_parser("memory-one")
    m.add_argument("--count", type=int, required=True)
    m.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--n", type=int, default=4, help="samples per prompt for (a)/(b); TOA gets n/2 per agent x 2 agents")
    p.add_argument("--toa-prompts", type=int, default=128, help="prompts for (c): a tree is sequential, so more prompts keep the server full")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=32, help="requests in flight (raw) = agent max_concurrency (toa)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--model", default="embedded:smollm2-135m-instruct")
    p.add_argument("--base-url")
    p.add_argument("--dtype", default="float32", help="of the started server (the c/d goal is on float32)")
    p.add_argument("--model-name")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY")
    p.add_argument("--reward", default="custom", choices=["custom", "similarity"])
    p.add_argument("--memory", type=int, nargs="*", default=[10_000, 100_000])
    p.add_argument("--memory-batch-size", type=int, default=1000)
    args = p.parse_args()
    if args.cmd == "stub":
        serve_stub(args.port)
    elif args.cmd == "memory-one":
        memory_one(args.count, args.batch_size)
    else:
        benchmark(args)


if __name__ == "__main__":
    main()
