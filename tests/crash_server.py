"""A stand-in for `python -m vllm.entrypoints.openai.api_server` for the kill -9 campaign
(tests/crash_campaign.py), named as `launch.python` through a one-line shell script like
tests/fake_vllm.py, but slow to start and counting: it sleeps CRASH_SERVER_START_S before it
listens (so a kill can land during server start), answers each chat completion after
CRASH_SERVER_SLOW_S (so calls are in flight), and appends one JSON line per event to
CRASH_SERVER_LOG: its pid at start, when it listens, and every chat request with its arrival
and answer times (wall clock, comparable with the test process). Answers depend only on the
request (like tests/openai_double.py), so a replayed call and a repeated one read the same."""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_LOG_LOCK = threading.Lock()


def log_event(path: str, **event) -> None:
    line = json.dumps({"t": time.time(), "pid": os.getpid(), **event}) + "\n"
    with _LOG_LOCK, open(path, "a", encoding="utf-8") as fh:  # one write per line: whole lines survive a kill
        fh.write(line)
        fh.flush()


def completion(body: dict) -> dict:
    n = body.get("n") or 1
    last = body["messages"][-1]["content"]
    choices = [{"index": i, "finish_reason": "stop",
                "message": {"role": "assistant", "content": f"launched {i} (seed {body.get('seed')}) to: {last[:40]}"}}
               for i in range(n)]
    return {"id": "crash-server", "object": "chat.completion", "created": 0, "model": body.get("model", "m"),
            "choices": choices, "usage": {"prompt_tokens": 5, "completion_tokens": 3 * n, "total_tokens": 5 + 3 * n}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-m")
    parser.add_argument("--port", type=int)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--served-model-name")
    args, _ = parser.parse_known_args()
    log = os.environ["CRASH_SERVER_LOG"]
    slow_s = float(os.environ.get("CRASH_SERVER_SLOW_S", "0.3"))
    log_event(log, ev="start")
    time.sleep(float(os.environ.get("CRASH_SERVER_START_S", "1.5")))  # "loading the model"
    running = [0]

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a) -> None:
            pass

        def _json(self, payload: dict, content_type: str = "application/json") -> None:
            data = json.dumps(payload).encode() if isinstance(payload, dict) else payload
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path == "/health":
                self._json({})
            elif self.path == "/metrics":  # vLLM's gauges: a busy server, never a stalled one
                self._json(f'vllm:num_requests_running{{model_name="m"}} {running[0]}.0\n'
                           f'vllm:generation_tokens_total{{model_name="m"}} {time.time():.0f}.0\n'.encode(),
                           "text/plain")
            else:
                self._json({"data": [{"id": args.served_model_name}]})

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            rid = uuid.uuid4().hex
            log_event(log, ev="req", id=rid, body=body)
            running[0] += 1
            try:
                time.sleep(slow_s)
                self._json(completion(body))
            except OSError:
                pass  # the client is gone (killed)
            finally:
                running[0] -= 1
                log_event(log, ev="ans", id=rid)

    server = ThreadingHTTPServer((args.host, args.port), Handler)
    server.daemon_threads = True
    log_event(log, ev="listen", port=args.port)
    server.serve_forever()


if __name__ == "__main__":
    main()
