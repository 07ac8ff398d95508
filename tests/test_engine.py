"""Engine bookkeeping: the process-wide reward cache holds only the live batches' prompts, so a
long run's memory stays flat in the number of prompts (benchmarks/throughput.py measures it);
the garbage collector's settings for a run."""

from __future__ import annotations

import subprocess
import sys

from pydantic import SecretStr

from toa.config import load_config
from toa.engine import Engine
from toa.rows import OK, Prompt
from toa.servers import Endpoint
from toa.storage import ShardWriter, Store


def char_count(prompt, response, reference):
    return float(len(response))


def test_reward_records_are_dropped_when_no_live_batch_needs_them(tmp_path):
    cfg = load_config(None, {"reward": {"kind": "custom", "function": f"{__name__}:char_count"},
                             "agents": [{"alias": "a", "endpoint": {"base_url": "http://127.0.0.1:9/v1", "model": "m", "api_key": "k"}}]})
    engine = Engine(cfg, {"a": Endpoint("a", "http://127.0.0.1:9/v1", "m", SecretStr("k"), "m")})
    try:
        store = Store(str(tmp_path))
        shared, only_first = Prompt("p1", "shared prompt"), Prompt("p2", "first batch only")
        first, second = ShardWriter(store, "rewards", "batch=b1"), ShardWriter(store, "rewards", "batch=b2")

        async def open_and_score():
            engine.open_batch([shared, only_first], {}, first)
            engine.open_batch([shared], {}, second)
            return await engine.rewards.score(shared, ["abc"]), await engine.rewards.score(only_first, ["de"])

        s1, s2 = engine.run(open_and_score())
        assert s1[0].value == 3.0 and s2[0].value == 2.0 and s1[0].status == OK
        assert len(engine.rewards.records) == 2

        async def close(prompts, sink):
            engine.close_batch(prompts, sink)

        engine.run(close([shared, only_first], first))
        kept = {r.prompt_id for r in engine.rewards.records.values()}
        assert kept == {"p1"}  # p2 is done; p1 is still in batch b2
        engine.run(close([shared], second))
        assert engine.rewards.records == {} and engine.reward_cache == {} and engine.reward_keys == {}
    finally:
        engine.close()


def test_the_first_engine_settles_the_garbage_collector_once_and_keeps_a_higher_setting():
    # A fresh interpreter (a real process): the settings are the process's, made once.
    script = """
import gc
from toa.engine import GC_THRESHOLDS, settle_gc
gc.set_threshold(700, 50, 10)  # a user's own gen-1 setting, above toa's
alive = len(gc.get_objects())
settle_gc()
first = (gc.get_threshold(), gc.get_freeze_count())
gc.set_threshold(*GC_THRESHOLDS[:2], 3)
settle_gc()  # a second engine in the process changes nothing
print(first[0], first[1] >= alive, gc.get_threshold())
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["(10000,", "50,", "10)", "True", "(10000,", "10,", "3)"]
