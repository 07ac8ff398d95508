"""A stand-in for `python -m vllm.entrypoints.openai.api_server` (named as `launch.python`
through a one-line shell script): it reads vLLM's --port and --served-model-name, answers
/health and /v1/models, and answers chat completions as FAKE_VLLM_CHAT says: "ok" (at once) or
"never" (a server that loads but does not generate). Used to test readiness without vLLM."""

from __future__ import annotations

import argparse
import json
import os
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-m")
    parser.add_argument("--port", type=int)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--served-model-name")
    args, _ = parser.parse_known_args()
    chat = os.environ.get("FAKE_VLLM_CHAT", "ok")

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a) -> None:
            pass

        def _json(self, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path == "/health":
                self._json({})
            else:
                self._json({"data": [{"id": args.served_model_name}]})

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if chat == "never":
                time.sleep(3600)
            self._json({"choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "1 2 3"}}],
                        "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}})

    server = ThreadingHTTPServer((args.host, args.port), Handler)
    server.daemon_threads = True
    print(f"fake vLLM on {args.port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
