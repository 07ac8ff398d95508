"""A test double of an OpenAI-compatible chat server: a real HTTP server on 127.0.0.1 (in a
thread of the test process) that the real request layer talks to over real sockets.

The first path segment picks a behaviour, so one double serves several agents at once:
    http://127.0.0.1:<port>/ok/v1     answers every chat completion
    http://127.0.0.1:<port>/500/v1    answers 500 Internal Server Error
    http://127.0.0.1:<port>/hang/v1   answers only after `hang_s` (past the client's timeout)
    http://127.0.0.1:<port>/close/v1  closes the connection without answering
    http://127.0.0.1:<port>/slow/v1   answers after `slow_s` (a server that is busy, not broken)
    http://127.0.0.1:<port>/stall/v1  never answers (until healed), and its /stall/metrics reports
                                      the waiting requests as running with token counters that
                                      never move: vLLM's metrics of a stalled engine
Setting `healed = True` makes every path answer (the server "recovered"). A wrong API key gets
401 with the offered key echoed in the message, as some hosted APIs do, so tests can check that
toa never stores or re-raises it. Every request is counted with its arrival time.

Also here: tiny custom reward functions for the fault tests ("module:function" import paths).
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from toa.servers.attach import PROBE_MESSAGES


class OpenAIDouble:
    def __init__(self, api_key: str, hang_s: float = 3.0, slow_s: float = 1.0):
        self.api_key, self.hang_s, self.slow_s, self.healed = api_key, hang_s, slow_s, False
        self.stalled = 0  # requests held by the "stall" mode right now
        self.requests: list[tuple[str, float, dict]] = []  # (mode, arrival time, body)
        self.probes: list[dict] = []  # toa's identity probes (toa.servers.attach.fingerprint), apart
        self.auth_seen: list[str] = []
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> OpenAIDouble:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def url(self, mode: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/{mode}/v1"

    def arrivals(self, mode: str) -> list[float]:
        with self.lock:
            return [t for m, t, _ in self.requests if m == mode]


def _completion(body: dict) -> dict:
    n = body.get("n") or 1
    last = body["messages"][-1]["content"]
    choices = [{"index": i, "finish_reason": "stop",
                "message": {"role": "assistant", "content": f"answer {i} (seed {body.get('seed')}) to: {last[:40]}"}}
               for i in range(n)]
    return {"id": "double", "object": "chat.completion", "created": 0, "model": body.get("model", "m"),
            "choices": choices, "usage": {"prompt_tokens": 5, "completion_tokens": 3 * n, "total_tokens": 5 + 3 * n}}


def _handler(double: OpenAIDouble):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # keep pytest output clean
            pass

        def _send(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _answer_if_listening(self, body: dict) -> None:
            try:
                self._send(200, _completion(body))
            except OSError:
                pass  # the client gave up

        def _authorized(self) -> bool:
            offered = self.headers.get("Authorization", "").removeprefix("Bearer ")
            double.auth_seen.append(offered)
            if offered == double.api_key:
                return True
            self._send(401, {"error": {"message": f"Incorrect API key provided: {offered}", "type": "invalid_request_error"}})
            return False

        def do_GET(self) -> None:
            if self.path.endswith("/metrics"):  # like vLLM: metrics need no key
                page = (f'vllm:num_requests_running{{engine="0",model_name="m"}} {double.stalled}.0\n'
                        'vllm:num_requests_waiting{engine="0",model_name="m"} 0.0\n'
                        'vllm:generation_tokens_total{engine="0",model_name="m"} 42.0\n'
                        'vllm:prompt_tokens_total{engine="0",model_name="m"} 420.0\n').encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(page)))
                self.end_headers()
                self.wfile.write(page)
                return
            if self._authorized():
                self._send(200, {"object": "list", "data": [{"id": "m", "object": "model"}]})

        def do_POST(self) -> None:
            mode = self.path.strip("/").split("/")[0]
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            if body.get("messages") == PROBE_MESSAGES:  # answered in every mode and not counted as a
                double.probes.append(body)              # model call: tests count the calls a run makes
                if self._authorized():
                    self._send(200, _completion(body))
                return
            with double.lock:
                double.requests.append((mode, time.monotonic(), body))
            if not self._authorized():
                return
            if double.healed or mode == "ok":
                self._send(200, _completion(body))
            elif mode == "500":
                self._send(500, {"error": {"message": "the double is down", "type": "server_error"}})
            elif mode == "hang":
                time.sleep(double.hang_s)
                try:
                    self._send(200, _completion(body))
                except OSError:
                    pass  # the client gave up (timeout): nobody is listening any more
            elif mode == "slow":
                time.sleep(double.slow_s)
                self._answer_if_listening(body)
            elif mode == "stall":
                with double.lock:
                    double.stalled += 1
                try:
                    deadline = time.monotonic() + 600
                    while not double.healed and time.monotonic() < deadline:
                        time.sleep(0.05)
                finally:
                    with double.lock:
                        double.stalled -= 1
                self._answer_if_listening(body)
            elif mode == "close":
                self.close_connection = True
                self.connection.shutdown(2)  # drop the connection mid-request, no response
            else:
                self._send(404, {"error": {"message": f"unknown mode {mode!r}"}})

    return Handler


# -- custom reward functions for the fault tests (import path "openai_double:<name>") ----------
FLAKY = {"failures_left": 0, "broken": False, "calls": 0}


def flaky_length(prompt: str, response: str, reference: str | None) -> float:
    """Raises while `broken`, and `failures_left` more times after that (transient faults)."""
    FLAKY["calls"] += 1
    if FLAKY["broken"]:
        raise RuntimeError("reward backend is down")
    if FLAKY["failures_left"] > 0:
        FLAKY["failures_left"] -= 1
        raise ConnectionError("reward backend hiccup")
    return float(len(response))


def length(prompt: str, response: str, reference: str | None) -> float:
    return float(len(response))
