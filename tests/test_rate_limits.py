"""Per-endpoint limits across processes (toa.limits), for real: a real Prefect API
(prefect_test_harness), OS processes sending requests through toa's request layer, and a real
HTTP server in this process, `SlowOpenAIDouble` (a test double of an OpenAI chat server), that
holds every request for a while and records when each was in flight."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from pydantic import SecretStr

from toa.calls import ClientPolicy, EndpointClient
from toa.config import AgentConfig
from toa.limits import (
    GlobalLimitError,
    LimitNames,
    ensure_limits,
    names_for,
    rate_slots,
    require_shared_api,
)
from toa.plan import run_id
from toa.servers import Endpoint


class _Server(ThreadingHTTPServer):
    request_queue_size = 128  # the default backlog of 5 delays a burst of connections by a SYN retry (1 s)
    daemon_threads = True


class SlowOpenAIDouble:
    """Answers chat completions after `hold_s`; records (tag, start, end) of every request, the
    tag being the first word of the last message, and the most requests ever in flight."""

    def __init__(self, hold_s: float):
        self.hold_s, self.lock = hold_s, threading.Lock()
        self.in_flight = self.max_in_flight = 0
        self.spans: list[tuple[str, float, float]] = []
        self.server = _Server(("127.0.0.1", 0), _handler(self))
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _handler(double: SlowOpenAIDouble):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:
            pass

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            start = time.monotonic()
            with double.lock:
                double.in_flight += 1
                double.max_in_flight = max(double.max_in_flight, double.in_flight)
            time.sleep(double.hold_s)  # the "model" at work
            with double.lock:
                double.in_flight -= 1
                double.spans.append((body["messages"][-1]["content"].split()[0], start, time.monotonic()))
            data = json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": "m",
                               "choices": [{"index": 0, "finish_reason": "stop",
                                            "message": {"role": "assistant", "content": "ok"}}],
                               "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    return Handler


# A worker process: builds toa's EndpointClient with the given Prefect limit names, says
# "ready", waits for "go" on stdin (a barrier, so the processes really run at the same time),
# sends its requests concurrently and exits non-zero if any failed.
CHILD = r"""
import asyncio, sys
from pydantic import SecretStr
from toa.calls import ClientPolicy, EndpointClient
from toa.limits import LimitNames
from toa.servers import Endpoint

url, tag, n, limit = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
names = LimitNames(concurrency=limit) if limit != "-" else None
ep = Endpoint(alias="a", base_url=url, model="m", api_key=SecretStr("k"), identity="double", supports_logprobs=False)
client = EndpointClient(ep, {"max_tokens": 1}, ClientPolicy(retries=0, global_limits=names))

async def main():
    await asyncio.gather(*(client.complete([{"role": "user", "content": f"{tag} {i}"}], 1, i) for i in range(n)))

print("ready", flush=True)
sys.stdin.readline()
asyncio.run(main())
print("done", flush=True)
"""


def _api_url() -> str:
    from prefect.settings import get_current_settings

    return get_current_settings().api.url


def run_workers(url: str, limit: str, procs: int = 2, requests: int = 4) -> None:
    env = {**os.environ, "PREFECT_API_URL": _api_url(), "PREFECT_LOGGING_LEVEL": "WARNING"}
    children = [subprocess.Popen([sys.executable, "-c", CHILD, url, f"p{i}", str(requests), limit], env=env,
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for i in range(procs)]
    try:
        for child in children:  # blocks until the child is set up (or has died: '' then)
            assert child.stdout.readline().strip() == "ready", child.communicate(timeout=30)[1][-3000:]
        for child in children:
            child.stdin.write("go\n")
            child.stdin.flush()
        for child in children:
            out, err = child.communicate(timeout=120)
            assert child.returncode == 0 and "done" in out, err[-3000:]
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()


def _read_limit(name: str):
    from prefect.client.orchestration import get_client

    async def read():
        async with get_client() as client:
            return await client.read_global_concurrency_limit_by_name(name)
    return asyncio.run(read())


def agent(limit: dict) -> AgentConfig:
    return AgentConfig(alias="a", endpoint={"base_url": "http://127.0.0.1:9/v1", "model": "m"}, global_limit=limit)


@pytest.mark.integration
def test_global_concurrency_limit_holds_across_processes(prefect_api):
    start = time.perf_counter()
    asyncio.run(ensure_limits([agent({"name": "toa-test-cross", "concurrency": 2})]))
    assert _read_limit("toa-test-cross").limit == 2
    double = SlowOpenAIDouble(hold_s=1.0)
    try:
        run_workers(double.url, "-")  # baseline: no global limit
        unlimited = double.max_in_flight
        double.max_in_flight, double.spans = 0, []
        run_workers(double.url, "toa-test-cross")
        limited, spans = double.max_in_flight, list(double.spans)
    finally:
        double.close()
    # Unlimited, more than one process's 4 requests were in flight at once: the barrier makes the
    # processes send together. Limited, the same two processes never had more than 2 in flight
    # between them (per-process limits of 2 would have allowed 4).
    assert unlimited > 4
    assert limited <= 2 and len(spans) == 8 and {t for t, _, _ in spans} == {"p0", "p1"}
    assert _read_limit("toa-test-cross").active_slots == 0  # every slot released
    print(f"cross-process limit test: {time.perf_counter() - start:.1f}s, max in flight {unlimited} -> {limited}")


@pytest.mark.integration
async def test_rate_limit_spaces_requests(prefect_api):
    rpm = 120  # 2 per second, bursts of up to 2
    await ensure_limits([agent({"name": "toa-test-rate", "requests_per_minute": rpm})])
    rate = await asyncio.to_thread(_read_limit, "toa-test-rate-rate")
    assert (rate.limit, rate.slot_decay_per_second) == (2, pytest.approx(2.0))
    double = SlowOpenAIDouble(hold_s=0.0)
    names = names_for(agent({"name": "toa-test-rate", "requests_per_minute": rpm}).global_limit)
    assert names == LimitNames(concurrency=None, rate="toa-test-rate-rate")
    try:
        spans = {}
        for label, policy in (("free", ClientPolicy()), ("limited", ClientPolicy(global_limits=names))):
            ep = Endpoint(alias="a", base_url=double.url, model="m", api_key=SecretStr("k"), identity="d", supports_logprobs=False)
            client = EndpointClient(ep, {"max_tokens": 1}, policy)
            double.spans = []
            await asyncio.gather(*(client.complete([{"role": "user", "content": f"{label} {i}"}], 1, i) for i in range(8)))
            await client.aclose()
            starts = sorted(s for _, s, _ in double.spans)
            spans[label] = starts[-1] - starts[0]
    finally:
        double.close()
    assert spans["free"] < 1.0
    # 8 requests, a burst of 2, then 2 per second: at least ~3 s between the first and last
    assert spans["limited"] >= 2.5, spans


def test_rate_slots_allow_a_one_second_burst():
    assert rate_slots(120) == (2, 2.0)
    assert rate_slots(30) == (1, 0.5)  # below one a second: still one slot, or nothing would start


def test_global_limits_need_a_shared_prefect_api():
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        with pytest.raises(GlobalLimitError, match="PREFECT_API_URL"):
            require_shared_api([agent({"name": "x", "concurrency": 2})])
        require_shared_api([AgentConfig(alias="a", endpoint={"base_url": "http://h/v1", "model": "m"})])  # no limit: fine


@pytest.mark.integration
def test_a_named_limit_that_does_not_exist_fails_clearly(prefect_api):
    with pytest.raises(GlobalLimitError, match="does not exist"):
        asyncio.run(ensure_limits([agent({"name": "toa-test-missing"})]))


def test_global_limit_is_operational_not_part_of_the_run_id():
    from toa.config import load_config

    ep = {"base_url": "http://h/v1", "model": "m"}
    plain = load_config(overrides={"agents": [{"alias": "a", "endpoint": ep}]})
    limited = load_config(overrides={"agents": [{"alias": "a", "endpoint": ep,
                                                 "global_limit": {"name": "x", "concurrency": 2}}]})
    assert limited.agents[0].global_limit.concurrency == 2
    assert run_id(plain) == run_id(limited)
