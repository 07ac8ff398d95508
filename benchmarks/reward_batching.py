"""Reward throughput: micro-batched vs one at a time, same model, same run.

    python benchmarks/reward_batching.py [--model embedded:all-minilm-l6-v2] [--n 256]
                                         [--transformers PATH [--trust-remote-code]]

For each backend it scores the same N (prompt, response) pairs twice, each time through a
fresh `RewardService` (so nothing is served from cache):
- batched: N concurrent callers (as many methods' prompts at once), gathered by the service
  into micro-batches of up to --batch-size;
- one at a time: N sequential score() calls of one item each, service max_batch=1 and a
  backend batch size of 1 (the reference code's way).
It prints items/s for both and the ratio. The model is loaded and warmed up before timing.

Default backend: the embedded similarity model (always installed). Pairs come from
/work/shared/data/alpaca_eval_805.jsonl (or ../shared/data relative to the repo) when present:
prompt = instruction, response = reference_output; the similarity reward needs a reference, so
the instruction doubles as it. Otherwise generated text of similar length.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from toa.reward import RewardService  # noqa: E402
from toa.rows import Prompt  # noqa: E402

ALPACA = Path(__file__).resolve().parents[2] / "shared" / "data" / "alpaca_eval_805.jsonl"


def load_pairs(n: int) -> tuple[list[tuple[Prompt, str]], str]:
    if ALPACA.exists():
        rows = [json.loads(line) for line in ALPACA.read_text().splitlines() if line.strip()][:n]
        pairs = [(Prompt(f"a{i}", r["instruction"], reference=r["instruction"]),
                  r["reference_output"]) for i, r in enumerate(rows)]
        return pairs, f"{ALPACA.name} ({len(pairs)} pairs)"
    rng = random.Random(0)
    words = "the model answers questions about rivers cities numbers and code".split()
    pairs = []
    for i in range(n):
        text = " ".join(rng.choices(words, k=rng.randint(8, 30)))
        pairs.append((Prompt(f"g{i}", text, reference=text),
                      " ".join(rng.choices(words, k=rng.randint(20, 200)))))
    return pairs, f"generated text ({n} pairs)"


async def batched(backend, pairs, batch_size: int) -> float:
    svc = RewardService(backend, max_batch=batch_size)
    start = time.perf_counter()
    results = await asyncio.gather(*(svc.score(p, [r]) for p, r in pairs))
    elapsed = time.perf_counter() - start
    check(results)
    return elapsed


async def one_at_a_time(backend, pairs) -> float:
    svc = RewardService(backend, max_batch=1)
    start = time.perf_counter()
    results = [await svc.score(p, [r]) for p, r in pairs]
    elapsed = time.perf_counter() - start
    check(results)
    return elapsed


def check(results) -> None:
    errors = [s.error for res in results for s in res if not s.ok]
    if errors:
        raise SystemExit(f"{len(errors)} reward errors, first: {errors[0]}")


def report(name: str, n: int, t_batched: float, t_single: float) -> None:
    b, s = n / t_batched, n / t_single
    print(f"{name}\n  batched:        {b:8.1f} items/s ({t_batched:.2f} s)\n"
          f"  one at a time:  {s:8.1f} items/s ({t_single:.2f} s)\n  ratio:          {b / s:8.2f}x")


async def bench(name: str, make, pairs, batch_size: int) -> None:
    fast, slow = make(batch_size), make(1)
    await fast.score_batch(pairs[:2])  # load + warm up, untimed
    slow._model = getattr(fast, "_model", None) or getattr(slow, "_model", None)  # one load
    await slow.score_batch(pairs[:1])
    report(name, len(pairs), await batched(fast, pairs, batch_size),
           await one_at_a_time(slow, pairs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="embedded:all-minilm-l6-v2",
                    help="similarity model (embedded:<name> or a sentence-transformers folder)")
    ap.add_argument("--transformers", help="also benchmark this local reward-model folder")
    ap.add_argument("--trust-remote-code", action="store_true")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=64, help="service micro-batch size")
    ap.add_argument("--rm-batch-size", type=int, default=8, help="transformers forward batch")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    pairs, source = load_pairs(args.n)
    print(f"pairs: {source}; device {args.device}")

    from toa.reward.similarity import SimilarityReward

    asyncio.run(bench(f"similarity {args.model}",
                      lambda bs: SimilarityReward(args.model, device=args.device, batch_size=bs),
                      pairs, args.batch_size))
    if args.transformers:
        from toa.reward.transformers_rm import TransformersReward

        def make(bs: int):
            return TransformersReward(args.transformers, device=args.device,
                                      batch_size=min(bs, args.rm_batch_size),
                                      trust_remote_code=args.trust_remote_code)

        asyncio.run(bench(f"transformers {Path(args.transformers).name}", make, pairs,
                          args.batch_size))


if __name__ == "__main__":
    main()
