"""TOA with several simulations of one tree in flight (docs/methods.md §5.12) against the
sequential search: wall time per prompt and mean best reward, same prompts, same budget.

    python benchmarks/toa_parallel.py [--prompts 16] [--n 4] [--agents 2] [--parallel 4]
                                      [--prompt-concurrency 1] [--max-tokens 64]
                                      [--base-url URL --model NAME --api-key-env VAR | --stub]

Runs the real `toa` flow (a throwaway Prefect API, Parquet results) twice with method `toa` in
mode "improved" (parallel > 1 needs it; both runs use it, so `parallel` is the only difference):
`parallel = 1`, the sequential search, then `parallel = --parallel`. Each run writes to its own
results root, so neither replays the other's recorded calls. Agents are `--agents` aliases of
one server (benchmarks/throughput.py's agents_for), n samples each, so n * M plays per prompt.

Wall time per prompt = the flow call's wall time / prompts. `--prompt-concurrency` (default 1)
is the prompts of the batch in flight at once: at 1 it is one tree's latency (plus the flow's
fixed cost shared out), which is what parallel simulations shorten; raise it to see what is
left of the gain once many trees keep the server busy. Mean best reward per prompt comes from
the `prompts_best` view (sql/summary.sql) through toa.db.query.

Server: --base-url/--model/--api-key-env attach to an OpenAI-compatible server; by default the
embedded vLLM CPU server is started (`--model`, default embedded:smollm2-135m-instruct) as
throughput.py does; `--stub` uses throughput.py's stub server, which answers at once: a quick
smoke test of this script and of the orchestration, not a measurement of the search. The
reward defaults to throughput.py's free length reward so the numbers are the orchestration's.
Prompts: AlpacaEval (../shared/data) when present, else the packaged default set.

The last line:
    toa_parallel: wall per prompt <x> s sequential, <y> s parallel=<k> (ratio <r>); mean best reward <a> vs <b>
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
EMBEDDED = "embedded:smollm2-135m-instruct"
KEY_ENV = "TOA_BENCH_KEY"  # the variable the flow's agents read the server's key from


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--n", type=int, default=4, help="samples per agent: n * agents plays per prompt")
    p.add_argument("--agents", type=int, default=2, help="aliases of the one server")
    p.add_argument("--parallel", type=int, default=4, help="simulations in flight per tree in the parallel run")
    p.add_argument("--virtual-loss", type=float, default=None, help="default: the option's (docs/methods.md §5.12)")
    p.add_argument("--prompt-concurrency", type=int, default=1, help="prompts in flight at once (1: per-tree latency)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=32, help="requests in flight per agent")
    p.add_argument("--reward", default="custom", choices=["custom", "similarity"],
                   help="custom: throughput.py's free length reward")
    p.add_argument("--model", default=EMBEDDED, help="embedded model spec, or the served model with --base-url")
    p.add_argument("--base-url", help="attach to this OpenAI-compatible server instead of starting one")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="with --base-url: the variable holding its key")
    p.add_argument("--stub", action="store_true", help="throughput.py's stub server (smoke test)")
    return p.parse_args(argv)


def throughput_module():
    """benchmarks/throughput.py, whose helpers this script reuses (imported on first use: it
    sets its environment defaults when imported)."""
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))  # also what makes its custom reward importable by name
    import throughput

    return throughput


@contextlib.contextmanager
def server(args: argparse.Namespace, work: Path) -> Iterator[tuple[str, str, str]]:
    """(base_url, model, api key) of the server to use, stopped on exit if started here."""
    if args.base_url:
        yield args.base_url, args.model, os.environ[args.api_key_env]
    elif args.stub:
        proc, url = throughput_module().start_stub()
        try:
            yield url, "stub", "stub-key"
        finally:
            proc.kill()
            proc.wait()
    else:
        from toa.servers import LaunchSpec, start_vllm

        t0 = time.perf_counter()
        handle = start_vllm("bench", LaunchSpec(model=args.model), work / "logs")
        print(f"server {args.model} up in {time.perf_counter() - t0:.0f} s", flush=True)
        try:
            ep = handle.endpoint
            yield ep.base_url, ep.model, ep.api_key.get_secret_value()
        finally:
            handle.stop()


def run_toa(root: Path, prompts_file: Path, agents: list[dict], args: argparse.Namespace, reward: dict,
            options: dict) -> tuple[float, str]:
    """Wall time of one `toa` flow call with method toa and these options, and its run id."""
    from toa.flows.synthesize import toa

    overrides = {"agents": agents, "reward": reward, "batch_size": args.prompts,
                 "prompt_concurrency": args.prompt_concurrency, "prompts": {"path": str(prompts_file)},
                 "method_options": {"toa": options}}
    start = time.perf_counter()
    result = toa(methods=["toa"], n=args.n, results_root=str(root), overrides=overrides)
    return time.perf_counter() - start, result["run_id"]


def best_rewards(root: Path, run: str) -> tuple[float, int]:
    """Mean over prompts of the best reward (view prompts_best) and the generations made."""
    from toa.db import query
    from toa.storage import Store

    frame = query(Store(str(root)), "SELECT avg(best_reward) AS best, sum(generations)::BIGINT AS generations "
                                    "FROM prompts_best WHERE run_id = ? AND method = 'toa'", [run])
    return float(frame["best"][0]), int(frame["generations"][0])


def measure(args: argparse.Namespace, work: Path) -> dict[int, tuple[float, float, int]]:
    """{parallel: (wall seconds per prompt, mean best reward, generations)} for 1 and --parallel."""
    from prefect.testing.utilities import prefect_test_harness

    tp = throughput_module()
    sampling = {"temperature": 0.7, "top_p": 1.0, "max_tokens": args.max_tokens}
    prompts = tp.load_prompts(args.prompts)
    prompts_file = tp.write_prompts(prompts, work / "prompts.jsonl")
    reward = {"kind": "custom", "function": tp.REWARD_FN} if args.reward == "custom" else {"kind": args.reward}
    extra = {} if args.virtual_loss is None else {"virtual_loss": args.virtual_loss}
    out = {}
    with server(args, work) as (base_url, model, key):
        os.environ[KEY_ENV] = key
        aliases = [chr(ord("a") + i) for i in range(args.agents)]
        agents = tp.agents_for(base_url, model, KEY_ENV, aliases, sampling, args.concurrency)
        asyncio.run(tp.raw_client(base_url, model, key, prompts[:4], 1, sampling, 4, False))  # warm-up
        with prefect_test_harness(server_startup_timeout=120):
            # a first flow call pays for imports, task registration and view creation: not timed
            warm = tp.write_prompts(prompts[:1], work / "warm-up.jsonl")
            run_toa(work / "warm-up", warm, agents, args, reward, {"mode": "improved"})
            for k in (1, args.parallel):
                options = {"mode": "improved", "parallel": k, **(extra if k > 1 else {})}
                seconds, run = run_toa(work / f"parallel-{k}", prompts_file, agents, args, reward, options)
                out[k] = (seconds / args.prompts, *best_rewards(work / f"parallel-{k}", run))
    return out


def report(args: argparse.Namespace, out: dict[int, tuple[float, float, int]]) -> list[str]:
    (seq, seq_best, seq_gen), (par, par_best, par_gen) = out[1], out[args.parallel]
    setup = (f"{args.prompts} prompts, {args.agents} agents x n={args.n} ({args.n * args.agents} plays per prompt), "
             f"{args.prompt_concurrency} prompt(s) in flight, max_tokens={args.max_tokens}, reward={args.reward}"
             f"{', stub server' if args.stub else ''}")
    last = (f"toa_parallel: wall per prompt {seq:.3f} s sequential, {par:.3f} s parallel={args.parallel} "
            f"(ratio {par / seq:.3f}); mean best reward {seq_best:.4f} vs {par_best:.4f}")
    return [setup, f"generations: {seq_gen} sequential, {par_gen} parallel={args.parallel}", last]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.parallel < 2:
        raise SystemExit("--parallel must be at least 2: the sequential run is parallel=1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    with tempfile.TemporaryDirectory(prefix="toa-parallel-") as tmp:
        for line in report(args, measure(args, Path(tmp))):
            print(line)


if __name__ == "__main__":
    main()
