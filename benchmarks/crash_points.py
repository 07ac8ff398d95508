"""kill -9 at seeded points over every phase of a run, then a rerun: what a crash costs
(docs/design.md §4.2). The campaign itself is tests/crash_campaign.py (shared with
tests/test_crash_points.py): `toa run` / `toa export` / `toa report` / `toa evolve` as real
processes against a test double and a launched stand-in server, no vLLM, one temporary Prefect
API for all of them.

    python benchmarks/crash_points.py [--seed 20261130]      (default: $TOA_CRASH_SEED or 20261130)

Prints one row per kill (round, phase, trigger, delay, generations in flight), kills per phase,
and last
    crash points: <k> kills, <r> calls repeated of <f> in flight, <l> lost, <d> duplicates
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1] / "tests"
sys.path.insert(0, str(TESTS))  # the campaign and its test double live with the tests

from crash_campaign import Campaign, campaign_seed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=campaign_seed())
    parser.add_argument("--verbose", action="store_true", help="print each kill as it happens")
    parser.add_argument("--keep", help="work in this (new) folder and keep it: roots, run files, logs")
    args = parser.parse_args()
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    log = (lambda s: print(s, file=sys.stderr, flush=True)) if args.verbose else (lambda s: None)
    with tempfile.TemporaryDirectory(prefix="toa-crash-") as tmp, prefect_test_harness(server_startup_timeout=120):
        if args.keep:
            Path(args.keep).mkdir(parents=True)
            tmp = args.keep
        env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
        figures = Campaign(Path(tmp), env, args.seed, log).run()
    print(f"seed {args.seed}")
    print(figures.table())
    if figures.lost or figures.corrupt or any(figures.duplicates.values()) or figures.leaked \
            or any(figures.reruns.values()) or figures.repeated > figures.in_flight:
        print("FINDINGS:", *figures.lost, *figures.corrupt, *figures.leaked, sep="\n  ", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
