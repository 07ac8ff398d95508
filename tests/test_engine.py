"""Engine bookkeeping: the process-wide reward cache holds only the live batches' prompts, so a
long run's memory stays flat in the number of prompts (benchmarks/throughput.py measures it)."""

from __future__ import annotations

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
