"""Storage at scale: write N synthetic samples with toa's own writer, then time the queries users
and the flow run on them (targets on a 2-core machine at 10 M rows: writing >= 50k rows/s, each
view query <= 2 s).

    python benchmarks/store_scale.py [--rows 10000000] [--root DIR] [--keep] [--queries-only]

The layout is the engine's (toa.engine._write_outputs, toa.storage.ShardWriter):
    samples/run=<id>/method=<m>/<batch>.parquet   one shard per (method, batch)
    calls/batch=<batch>/part-<uuid>.parquet       every method's calls of a batch, flush_rows per part
    prompts/source=<s>/<batch>.parquet, runs/run=<id>/<t>.parquet
Each sample is one generation, so it brings one `calls` row: "rows" counts samples, and the write
rate is samples (with their call rows) per second of writer time. The writer is the engine's:
Store.write_rows over typed rows for the samples shard, a ShardWriter (whose writer threads
encode the parts) for the calls, without its per-row crash journal (a cost of the live run, not
of the store).

Text is random words of a Zipf-distributed vocabulary (about the compressibility of real text),
sliced from one corpus built with numpy, so that making rows costs little next to writing them;
the time spent making rows is reported apart. Timed afterwards, each as a fresh connection (as
`toa sql` makes one): `method_summary`, `best_of_k` of one method, and SFT/DPO of one batch as
the build-datasets task makes them (read the shards, build, write the shards and the JSONL text).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from contextlib import contextmanager

import numpy as np

from toa.config import RunConfig, load_config
from toa.datasets import build_dpo, build_sft, dpo_jsonl, sft_jsonl
from toa.db import create_views, query
from toa.rows import CallRecord, PromptRow, RunRecord, SampleRow, content_key
from toa.servers.machine import cpu_info
from toa.storage import WRITER_THREADS, ShardWriter, Store

RUN_ID = "scale"
SOURCE = "synthetic"
AGENTS = ("agent_a", "agent_b", "agent_c", "agent_d")
METHODS = ("random", "parallel_ensemble", "moa", "toa")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=10_000_000, help="samples to write")
    p.add_argument("--root", help="results root (default: a new folder under /tmp/store_scale, removed at the end)")
    p.add_argument("--keep", action="store_true", help="keep the results root")
    p.add_argument("--queries-only", action="store_true", help="time the queries on an existing --root")
    p.add_argument("--methods", type=int, default=len(METHODS), choices=range(1, len(METHODS) + 1))
    p.add_argument("--batch-prompts", type=int, default=1000, help="prompts per batch")
    p.add_argument("--samples-per-prompt", type=int, default=16, help="budget: n * agents")
    p.add_argument("--text-bytes", type=int, default=1500, help="mean response length")
    p.add_argument("--repeat", type=int, default=3, help="runs of each query (the median is reported)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


# ---------------------------------------------------------------------------- synthetic text
class Synth:
    """Random rows made fast: texts are slices of one corpus of random words, ids random hex."""

    def __init__(self, seed: int, corpus_mb: int = 64):
        self.rng = np.random.default_rng(seed)
        self.corpus = self._corpus(corpus_mb)

    def _corpus(self, mb: int) -> str:
        vocab = 20_000
        letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz", dtype=np.uint8)
        freq = 1 / np.arange(1, 27)  # letters, and below words, roughly as skewed as English
        chars = self.rng.choice(letters, size=vocab * 10, p=freq / freq.sum()).tobytes().decode()
        words = np.array([chars[i * 10: i * 10 + n] for i, n in enumerate(self.rng.integers(1, 11, vocab))], dtype=object)
        zipf = 1 / np.arange(1, vocab + 1)
        picks = self.rng.choice(vocab, size=mb * 1_000_000 // 6, p=zipf / zipf.sum())
        return " ".join(words[picks])

    def texts(self, count: int, mean: int) -> list[str]:
        lengths = self.rng.integers(mean // 2, mean * 3 // 2, count)
        starts = self.rng.integers(0, len(self.corpus) - mean * 2, count)
        return [self.corpus[s:s + n] for s, n in zip(starts.tolist(), lengths.tolist())]

    def hex_ids(self, count: int, chars: int = 64) -> list[str]:
        blob = self.rng.bytes(count * chars // 2).hex()
        return [blob[i:i + chars] for i in range(0, count * chars, chars)]


# ---------------------------------------------------------------------------- writing
class Timer:
    """Wall seconds per stage, and CPU seconds (every thread of this process) of the stages asked
    for: on a machine busy with other work, CPU time shows what a stage itself cost. (Reading the
    CPU clock costs about as much as writing a small part, so only whole units read it.)"""

    def __init__(self):
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    @contextmanager
    def __call__(self, key: str, cpu: bool = False):
        wall, used = time.perf_counter(), time.process_time() if cpu else 0.0
        try:
            yield
        finally:
            self.wall[key] = self.wall.get(key, 0.0) + time.perf_counter() - wall
            if cpu:
                self.cpu[key] = self.cpu.get(key, 0.0) + time.process_time() - used

    def total(self, *keys: str) -> float:
        return sum(self.wall.get(k, 0.0) for k in keys)


def make_prompts(synth: Synth, count: int) -> list[PromptRow]:
    ids, texts = synth.hex_ids(count, 16), synth.texts(count, 300)
    key = content_key(ids)[:16]
    return [PromptRow(prompt_id=i, text=t, source=SOURCE, line=n, batch=key) for n, (i, t) in enumerate(zip(ids, texts))]


def make_rows(synth: Synth, method: str, prompts: list[PromptRow], per_prompt: int, text_bytes: int):
    """One (method, batch): its samples rows and their calls rows, as a run leaves them
    (refinement chains, a few failed calls and rewards)."""
    count = len(prompts) * per_prompt
    ids, texts = synth.hex_ids(count), synth.texts(count, text_bytes)
    rewards = synth.rng.normal(size=count).round(6).tolist()
    fails = (synth.rng.random(count) < 0.01).tolist()
    tokens = synth.rng.integers(100, 600, count).tolist()
    batch, now = prompts[0].batch, time.time()
    requests = [json.dumps({"messages": [{"role": "user", "content": p.text}], "max_tokens": 1024, "temperature": 0.7})
                for p in prompts]  # per prompt, the call's seed added below
    samples, calls = [], []
    for i in range(count):
        prompt, order, failed = prompts[i // per_prompt], i % per_prompt, fails[i]
        agent = AGENTS[order % len(AGENTS)]
        parent = ids[i - len(AGENTS)] if order >= len(AGENTS) else None
        text = None if failed else texts[i]
        samples.append(SampleRow(
            run_id=RUN_ID, method=method, batch=batch, prompt_id=prompt.prompt_id, sample_id=ids[i], order=order,
            agent=agent, action=agent, parent_id=parent, depth=order // len(AGENTS), text=text,
            finish_reason=None if failed else "stop", prompt_tokens=tokens[i] // 3, completion_tokens=tokens[i],
            latency_s=tokens[i] / 50, cached=False, status="error" if failed else "ok",
            error="TimeoutError: stalled" if failed else None, reward=None if failed else rewards[i],
            reward_status="error" if failed else "ok", reward_error="no response" if failed else None))
        calls.append(CallRecord(
            call_key=ids[i], prompt_id=prompt.prompt_id, agent=agent, model=f"{agent}@sha256:0123456789abcdef",
            request_json=f'{requests[i // per_prompt][:-1]}, "seed": {order}}}',
            seed=order, slot=order, text=text, finish_reason=samples[-1].finish_reason,
            prompt_tokens=tokens[i] // 3, completion_tokens=tokens[i], latency_s=tokens[i] / 50,
            status=samples[-1].status, error=samples[-1].error, created_at=now + i * 1e-3, logprob=-0.5 * tokens[i]))
    return samples, calls


def write_unit(store: Store, timer: Timer, method: str, batch: str, samples: list, calls: list) -> None:
    """What the engine writes for one (method, batch) (toa.engine.run_batch): the calls through
    a ShardWriter, whose part files are encoded by the writer threads while the next rows come,
    then the samples shard, then the wait for the call parts."""
    sink = ShardWriter(store, "calls", f"batch={batch}", journal=False)
    with timer("calls"):
        for call in calls:
            sink.append(call)
    with timer("samples"):
        store.write_rows("samples", samples, f"run={RUN_ID}", f"method={method}", f"{batch}.parquet")
    with timer("calls"):
        sink.flush()


def write_store(store: Store, args: argparse.Namespace) -> tuple[int, Timer]:
    timer, synth = Timer(), Synth(args.seed)
    methods = METHODS[:args.methods]
    per_batch = args.batch_prompts * args.samples_per_prompt * len(methods)
    batches = max(1, round(args.rows / per_batch))
    row = RunRecord(run_id=RUN_ID, started_at=time.time(), config_json=run_config(args).model_dump_json(),
                    models_json="{}", reward_id="synthetic")
    store.write_rows("runs", [row], f"run={RUN_ID}", "1.parquet")
    for b in range(batches):
        with timer("generate"):
            prompts = make_prompts(synth, args.batch_prompts)
        store.write_rows("prompts", prompts, f"source={SOURCE}", f"{prompts[0].batch}.parquet")  # not counted
        for method in methods:
            with timer("generate"):
                samples, calls = make_rows(synth, method, prompts, args.samples_per_prompt, args.text_bytes)
            with timer("write", cpu=True):
                write_unit(store, timer, method, prompts[0].batch, samples, calls)
        if b % 10 == 9 or b == batches - 1:
            rows = (b + 1) * per_batch
            print(f"  {rows:>11,} rows written, {rows / timer.wall['write']:,.0f} rows/s", flush=True)
    return batches * per_batch, timer


def run_config(args: argparse.Namespace) -> RunConfig:
    """The run's config as a run file gives it (its agents' endpoint is never called): the runs
    row holds it, and the budget of the best-of-k curves and the DPO rank come from it."""
    agents = [{"alias": a, "endpoint": {"base_url": "http://localhost:9/v1", "model": "synthetic"}} for a in AGENTS]
    return load_config(overrides={"n": args.samples_per_prompt // len(AGENTS), "agents": agents,
                                  "methods": list(METHODS[:args.methods])})


# ---------------------------------------------------------------------------- reading
def timed(fn, repeat: int) -> tuple[list[float], list[float], object]:
    """Wall and CPU seconds of each of `repeat` runs of fn, and its last result."""
    wall, cpu, out = [], [], None
    for _ in range(repeat):
        w, c = time.perf_counter(), time.process_time()
        out = fn()
        wall.append(time.perf_counter() - w)
        cpu.append(time.process_time() - c)
    return wall, cpu, out


def sft_dpo_one_batch(store: Store, method: str, batch: str, rejected_rank: int) -> tuple[int, int]:
    """One batch of the build-datasets task (tasks/datasets.py, the default method rule)."""
    shard = f"{batch}.parquet"
    samples = store.read("samples", f"run={RUN_ID}", f"method={method}", shard)
    prompts = store.read("prompts", f"source={SOURCE}", shard)
    sft, dpo = build_sft(samples, prompts), build_dpo(samples, prompts, rejected_rank)
    store.write_frame(sft, store.path("sft", f"run={RUN_ID}", f"method={method}", shard))
    store.write_frame(dpo, store.path("dpo", f"run={RUN_ID}", f"method={method}", shard))
    _lines = sft_jsonl(sft) + dpo_jsonl(dpo)  # what the task appends to its JSONL files
    return sft.height, dpo.height


def time_queries(store: Store, repeat: int) -> dict[str, float]:
    config = RunConfig.model_validate_json(query(store, "select config_json from runs where run_id = ?", [RUN_ID])[0, 0])
    method = config.methods[-1]  # toa, with every method written
    batch = os.path.basename(store.files("samples", f"run={RUN_ID}", f"method={method}")[0]).removesuffix(".parquet")
    checks = {
        "method_summary": lambda: query(store, "select * from method_summary"),
        "best_of_k": lambda: query(store, "select * from best_of_k where run_id = ? and method = ?", [RUN_ID, method]),
        "sft/dpo one batch": lambda: sft_dpo_one_batch(store, method, batch, config.rejected_rank),
    }
    out = {}
    for name, fn in checks.items():
        wall, cpu, result = timed(fn, repeat)
        out[name] = statistics.median(wall)
        shape = f"{result.height} rows" if hasattr(result, "height") else f"{result[0]} SFT rows, {result[1]} DPO pairs"
        print(f"{name:>18}: {out[name]:.2f} s, CPU {statistics.median(cpu):.2f} s "
              f"(runs: {', '.join(f'{r:.2f}' for r in wall)}; {shape})", flush=True)
    return out


# ---------------------------------------------------------------------------- main
def main() -> None:
    args = parse_args()
    os.makedirs("/tmp/store_scale", exist_ok=True)
    root = args.root or tempfile.mkdtemp(prefix="root-", dir="/tmp/store_scale")
    store = Store(root)
    cpu = cpu_info()
    print(f"store_scale: {cpu.model}, {len(cpu.cores)} cores; root {root}")
    try:
        rate = None
        if not args.queries_only:
            rate = write_and_report(store, args)
        times = time_queries(store, args.repeat)
        rows = query(store, "select count(*) as n from samples")["n"][0]
        print(f"store_scale: {rows} rows, write {f'{rate:.0f}' if rate else '-'} rows/s, "
              f"method_summary {times['method_summary']:.2f} s, best_of_k {times['best_of_k']:.2f} s, "
              f"sft/dpo one batch {times['sft/dpo one batch']:.2f} s")
    finally:
        if not args.keep and not args.root:
            shutil.rmtree(root, ignore_errors=True)


def write_and_report(store: Store, args: argparse.Namespace) -> float:
    store.init_tables()
    rows, timer = write_store(store, args)
    with timer("views"):
        create_views(store)
    wall = timer.wall["write"]
    print(f"generate: {timer.wall['generate']:.1f} s ({rows / timer.wall['generate']:,.0f} rows/s), not counted as writing")
    print(f"write: {rows:,} samples, each with its calls row, in {wall:.1f} s = {rows / wall:,.0f} rows/s "
          f"({rows / timer.cpu['write']:,.0f} per CPU second, {WRITER_THREADS} writer threads; samples shards "
          f"{timer.wall['samples'] / wall:.0%} of the wall, calls parts {timer.wall['calls'] / wall:.0%}); "
          f"create_views {timer.wall['views']:.2f} s; {du(store.root) / 1e9:.2f} GB on disk")
    return rows / wall


def du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


if __name__ == "__main__":
    main()
