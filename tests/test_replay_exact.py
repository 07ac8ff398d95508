"""Replay is exact (docs/design.md §4.1): what a resumed run stores equals what an uninterrupted
run stores. A replayed reward carries its record's status and note (the transformers backend's
"truncated", a judge's raw output); a replayed call carries its finish reason, tokens and
logprobs, whether its record comes from a shard or from the journal of a killed writer.

- fast: the reward service with a preloaded cache; the request layer replaying from records
  that went through a Parquet shard and through a killed writer's journal (in-process fake
  transport and fake reward backend, named as fakes);
- integration: `toa run` subprocesses against the OpenAI double (tests/openai_double.py) with
  an LLM-judge reward served by JudgeDouble below (a real HTTP server whose ratings come with
  logprobs, so every reward carries a note), a real Prefect API: a run killed with -9 and
  resumed stores the same `samples` table, column by column, as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import polars as pl
import pytest
from helpers import wait_until
from openai_double import OpenAIDouble
from pydantic import SecretStr

from toa.calls import CallLayer, ClientPolicy, EndpointClient
from toa.reward.service import RewardService, cache_from_records, reward_key
from toa.rows import ERROR, OK, Prompt, RewardRecord, Score
from toa.servers import Endpoint
from toa.storage import ShardWriter, Store

KEY = "sk-double-key"
# samples columns that legitimately differ between an uninterrupted run and a resumed one:
RUN_SPECIFIC = {
    "latency_s",  # the wall time of a real call: the two results roots made their calls separately
    "cached",  # whether this attempt replayed the sample: true for the resumed run's replays only
}


# -- fast: the reward service ------------------------------------------------------------------
class FakeNotingBackend:
    """In-process fake reward backend: every score comes with a note, as the transformers
    backend's "truncated to N tokens" and the judge's raw output do."""

    identity = "fake-noting"

    def __init__(self) -> None:
        self.calls = 0

    async def score_batch(self, items):
        self.calls += 1
        return [Score(float(len(r)), OK, f"truncated to 4 tokens (had {len(r)})") for _, r in items]


PROMPT = Prompt("p1", "What is 2 + 2?", reference="4")


async def test_a_replayed_reward_carries_the_status_and_note_of_its_record():
    backend, records = FakeNotingBackend(), []
    first = await RewardService(backend, sink=records.append).score(PROMPT, ["four", "4"])
    assert [s.error for s in first] == ["truncated to 4 tokens (had 4)", "truncated to 4 tokens (had 1)"]
    # A preloaded cache (what a resumed unit reads from its batch's shards) answers with the same Score.
    replay = RewardService(backend, cache=cache_from_records(records))
    again = await replay.score(PROMPT, ["four", "4"])
    assert again == first and backend.calls == 1 and replay.cache_hits == 2
    # A record from storage, by hand: value, status and note come back as stored.
    stored = RewardRecord(reward_key=reward_key("fake-noting", PROMPT, "five"), reward_id="fake-noting",
                          prompt_id="p1", response_sha="x", value=0.25, status=OK,
                          error="raw='7' mass=0.984 via=logprobs", latency_s=0.1, created_at=1.0)
    replay = RewardService(backend, cache={stored.reward_key: stored})
    assert await replay.score(PROMPT, ["five"]) == [Score(0.25, OK, "raw='7' mass=0.984 via=logprobs")]
    assert backend.calls == 1
    # An error record is still never served: it is scored again.
    failed = RewardRecord(**{**stored.__dict__, "reward_key": reward_key("fake-noting", PROMPT, "six"),
                             "value": None, "status": ERROR, "error": "boom"})
    replay = RewardService(backend, cache={failed.reward_key: failed})
    assert await replay.score(PROMPT, ["six"]) == [Score(3.0, OK, "truncated to 4 tokens (had 3)")]
    assert backend.calls == 2


# -- fast: the request layer -------------------------------------------------------------------
class FakeTransport:
    """In-process fake chat server: n choices, the last cut off ("length"), token logprobs."""

    def __init__(self) -> None:
        self.requests = 0

    async def __call__(self, url: str, body: bytes) -> tuple[int, bytes]:
        self.requests += 1
        n = json.loads(body)["n"]
        choices = [{"index": i, "finish_reason": "length" if i == n - 1 else "stop",
                    "message": {"role": "assistant", "content": f"reply {i}" + " more" * i},
                    "logprobs": {"content": [{"token": "t", "logprob": -0.1 * (i + 1) - 1e-9, "top_logprobs": []}] * (i + 1)}}
                   for i in range(n)]
        return 200, json.dumps({"choices": choices, "usage": {"prompt_tokens": 11, "completion_tokens": 99},
                                "metrics": {"time_to_first_token_ms": 3.0, "generation_time_ms": 4.0}}).encode()


def fake_layer(cache, sink):
    endpoint = Endpoint(alias="a", base_url="http://fake/v1", model="m", api_key=SecretStr("k"), identity="fake")
    client = EndpointClient(endpoint, {"temperature": 0.7, "max_tokens": 8}, ClientPolicy(), transport=FakeTransport())
    return CallLayer({"a": client}, cache, sink, run_seed=3, namespace="random"), client


MSG = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("through", ["shard", "journal of a killed writer"])
async def test_a_replayed_call_carries_finish_reason_tokens_and_logprobs(tmp_path, through):
    from toa.engine import calls_cache

    store = Store(str(tmp_path))
    writer = ShardWriter(store, "calls", "batch=b", flush_s=1e9)
    layer, _ = fake_layer({}, writer.append)
    made = await layer.for_prompt("p1")("a", MSG, 3, logprobs=True)
    if through == "shard":
        writer.flush()
    else:  # the writer dies with its rows only in its journal; the next writer recovers them
        writer._journal.close()
        ShardWriter(store, "calls", "batch=b")
    replay, client = fake_layer(calls_cache(store, "b"), lambda record: None)
    again = await replay.for_prompt("p1")("a", MSG, 3, logprobs=True)
    assert client.requests == 0 and all(g.cached for g in again) and not any(g.cached for g in made)
    assert [g.finish_reason for g in again] == ["stop", "stop", "length"]
    assert [g.completion_tokens for g in again] == [1, 2, 3] and all(g.logprob is not None for g in again)
    for first, replayed in zip(made, again):  # every field but `cached`, exactly (floats included)
        assert {**first.__dict__, "cached": True} == replayed.__dict__


# -- integration: a killed and resumed run against an uninterrupted one -------------------------
class JudgeDouble:
    """A test double of an LLM judge: a real OpenAI-compatible HTTP server on 127.0.0.1 (in a
    thread of the test process) that rates any answer 1-9 from a hash of the request, greedily
    and deterministically, with token logprobs, as vLLM returns them. Counts its requests."""

    def __init__(self) -> None:
        self.requests = 0
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _judge_handler(self))
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> JudgeDouble:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"


def _rating_reply(body: dict) -> dict:
    digest = hashlib.sha256(json.dumps(body.get("messages"), sort_keys=True).encode()).digest()
    rating, other = 1 + digest[0] % 9, 1 + digest[1] % 9
    top = [{"token": str(rating), "logprob": -0.1 - digest[2] / 1000, "bytes": None},
           {"token": str(other), "logprob": -2.5, "bytes": None}]
    choice = {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": str(rating)},
              "logprobs": {"content": [{**top[0], "top_logprobs": top}]}}
    return {"id": "judge", "object": "chat.completion", "created": 0, "model": body.get("model", "judge"),
            "choices": [choice], "usage": {"prompt_tokens": 50, "completion_tokens": 1, "total_tokens": 51}}


def _judge_handler(double: JudgeDouble):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:
            pass

        def _send(self, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # /v1/models: what attaching checks
            self._send({"object": "list", "data": [{"id": "judge", "object": "model"}]})

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            with double.lock:
                double.requests += 1
            try:
                self._send(_rating_reply(body))
            except OSError:
                pass  # the client is gone (the run was killed)

    return Handler


def run_file(path: Path, root: Path, double: OpenAIDouble, judge: JudgeDouble) -> Path:
    lines = [f"results_root = {json.dumps(str(root))}", 'methods = ["random", "toa"]', "n = 2", "seed = 5",
             "batch_size = 2", "[prompts]", "limit = 4", "[method_options.toa]", "width = 2",
             "[reward]", 'kind = "judge"', "[reward.endpoint]", f'base_url = "{judge.url}"', 'model = "judge"',
             'api_key = "judge-key"']
    for alias in ("a", "b"):  # one URL for both roots: the endpoint identity, hence every key, is the same
        lines += ["[[agents]]", f'alias = "{alias}"', "max_concurrency = 1", "[agents.endpoint]",
                  f'base_url = "{double.url("slow")}"', 'model = "m"', f'api_key = "{KEY}"',
                  "[agents.sampling]", "max_tokens = 8"]
    path.write_text("\n".join(lines) + "\n")
    return path


def toa_run(run_file: Path) -> subprocess.Popen:
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PYTHONPATH": str(Path(__file__).parent)}
    return subprocess.Popen([sys.executable, "-m", "toa.cli", "run", "--config", str(run_file), "--no-progress"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def finish(proc: subprocess.Popen) -> str:
    out = proc.communicate(timeout=300)[0].decode()
    assert proc.returncode == 0, out[-3000:]
    return out


def recorded_rewards(root: Path) -> set[tuple[str, str]]:
    """(prompt_id, response_sha) of every reward on disk: shard rows and journal lines."""
    found = set()
    for f in (root / "rewards").rglob("part-*.parquet"):
        found |= set(pl.read_parquet(f).select("prompt_id", "response_sha").iter_rows())
    for f in (root / "rewards").rglob("journal-*.jsonl"):
        for line in f.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # the line being written at the kill
            found.add((row["prompt_id"], row["response_sha"]))
    return found


def done_units(root: Path) -> set[tuple[str, str]]:
    return {(f.parent.name.removeprefix("method="), f.stem) for f in (root / "done").rglob("*.json")}


def samples(root: Path) -> pl.DataFrame:
    return Store(str(root)).read("samples").sort("method", "batch", "prompt_id", "order", "sample_id")


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_a_killed_and_resumed_run_stores_the_samples_of_an_uninterrupted_one(prefect_api, tmp_path):
    with OpenAIDouble(KEY, slow_s=0.3) as double, JudgeDouble() as judge:
        # Uninterrupted: the double answers at once.
        double.healed = True
        straight_root = tmp_path / "straight"
        finish(toa_run(run_file(tmp_path / "straight.toml", straight_root, double, judge)))

        # Interrupted: slow answers, one request at a time per agent; killed with -9 once a few
        # rewards are recorded, then resumed with the double answering at once again.
        double.healed = False
        resumed_root = tmp_path / "resumed"
        resumed_file = run_file(tmp_path / "resumed.toml", resumed_root, double, judge)
        proc = toa_run(resumed_file)
        wait_until(lambda: (resumed_root / "rewards").exists() and len(recorded_rewards(resumed_root)) >= 2,
                   180, "the first rewards", proc)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        rewarded_before, done_before = recorded_rewards(resumed_root), done_units(resumed_root)
        double.healed = True
        finish(toa_run(resumed_file))

    straight, resumed = samples(straight_root), samples(resumed_root)
    # The comparison means something: work was left at the kill, and the resume replayed calls
    # and rewards recorded before it (rewards with notes) into units it then finished.
    assert len(done_before) < 4 and resumed["cached"].any(), (done_before, resumed["cached"].sum())
    redone = resumed.filter(~pl.struct("method", "batch").map_elements(
        lambda u: (u["method"], u["batch"]) in done_before, return_dtype=pl.Boolean))
    replayed_rewards = [t for p, t in redone.select("prompt_id", "text").iter_rows()
                        if t is not None and (p, hashlib.sha256(t.encode()).hexdigest()) in rewarded_before]
    assert replayed_rewards, "no reward recorded before the kill was replayed: kill earlier"
    assert set(straight["reward_status"]) == {OK} and straight["reward_error"].str.starts_with("raw=").all()

    assert straight.columns == resumed.columns and straight.height == resumed.height == 4 * 4 * 2
    for column in straight.columns:
        if column in RUN_SPECIFIC:
            continue
        assert straight[column].to_list() == resumed[column].to_list(), f"samples.{column} differs after a resume"
