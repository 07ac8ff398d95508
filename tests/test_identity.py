"""Model identity (toa.identity, docs/design.md §4.1): launched and local models are named by the
content of their folders, hashed once per file version; attached endpoints by URL, model and
declared revision, checked by a behavioural fingerprint recorded in the results root, so a model
changed behind the same URL and name is not replayed as if nothing changed.

The attached endpoint is `Stub` below: a real HTTP server on 127.0.0.1 (a thread of the test
process) whose answers the test changes; the last test runs `toa run` against it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from toa import identity
from toa.config import ConfigError, load_config
from toa.identity import ModelChanged, check_endpoint, folder_digest, verify_attached
from toa.reward.transformers_rm import weights_fingerprint
from toa.reward.vllm_pool import launched_identity
from toa.servers.attach import PROBE_MESSAGES, ProbeFailed, attach, fingerprint
from toa.servers.spec import AttachSpec, LaunchSpec
from toa.servers.vllm import model_identity
from toa.storage import Store

KEY = "stub-key"


# ---------------------------------------------------------------------- a model behind a URL

class Stub:
    """An OpenAI-compatible server whose model the test swaps: chat completions answer `text`
    with token logprobs `logprobs`; /classify answers `scores`; `status` other than 200 fails
    every POST. Requests are kept as (path, body)."""

    def __init__(self, text: str = "walked into the storm", logprobs=(-0.01, -0.52, -1.3)):
        self.text, self.logprobs, self.scores, self.status = text, list(logprobs), [1.25], 200
        self.requests: list[tuple[str, dict]] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def probes(self) -> int:
        return sum(1 for path, body in self.requests if body.get("messages") == PROBE_MESSAGES or path.endswith("/classify"))

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _handler(stub: Stub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:
            pass

        def _send(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            self._send(200, {"object": "list", "data": [{"id": "m", "object": "model"}]})

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            stub.requests.append((self.path, body))
            if stub.status != 200:
                self._send(stub.status, {"error": {"message": "stub says no"}})
            elif self.path.endswith("/classify"):
                self._send(200, {"model": "m", "data": [{"index": 0, "probs": stub.scores}]})
            else:
                self._send(200, _chat(stub, body))

    return Handler


def _chat(stub: Stub, body: dict) -> dict:
    tokens = [{"token": w, "logprob": lp, "top_logprobs": []} for w, lp in zip(stub.text.split(), stub.logprobs)]
    n = body.get("n") or 1
    choice = {"finish_reason": "length", "message": {"role": "assistant", "content": stub.text},
              "logprobs": {"content": tokens} if body.get("logprobs") else None}
    return {"id": "stub", "object": "chat.completion", "created": 0, "model": body.get("model"),
            "choices": [{"index": i, **choice} for i in range(n)],
            "usage": {"prompt_tokens": 5, "completion_tokens": 4 * n, "total_tokens": 5 + 4 * n}}


@pytest.fixture
def stub():
    s = Stub()
    yield s
    s.close()


@pytest.fixture(autouse=True)
def fresh_process(monkeypatch, tmp_path):
    """Each test starts as a new process would: no remembered probes, its own digest cache."""
    monkeypatch.setattr(identity, "_PROBES", {})
    monkeypatch.setattr(identity, "_ACCEPTED", {})
    monkeypatch.setenv("TOA_HOME", str(tmp_path / "toa-home"))


def new_process() -> None:
    identity._PROBES.clear()  # what a second `toa run` starts with
    identity._ACCEPTED.clear()


def attached_cfg(root: Path, url: str, **more):
    agents = [{"alias": "a", "endpoint": {"base_url": url, "model": "m", "api_key": KEY, **more.pop("endpoint", {})}}]
    return load_config(None, {"results_root": str(root), "reward": {"kind": "math"}, "agents": agents, **more})


def endpoints_of(cfg):
    return {a.alias: attach(a.alias, a.endpoint) for a in cfg.agents}


def record_of(root: Path) -> dict:
    [path] = (root / "identity" / "endpoints").glob("*.json")
    return json.loads(path.read_text())


# ---------------------------------------------------------------------- local model folders

def model_folder(path: Path, weights: bytes = b"\1" * 4096) -> Path:
    path.mkdir()
    (path / "config.json").write_text('{"model_type": "llama"}')
    (path / "tokenizer.json").write_text('{"version": "1.0"}')
    (path / "model.safetensors").write_bytes(weights)
    return path


def rewrite_keeping_size_and_mtime(path: Path, data: bytes) -> None:
    """New bytes, same size, and the old mtime put back (what `cp -p` of a same-size file does)."""
    before = path.stat()
    assert len(data) == before.st_size
    path.write_bytes(data)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_mtime_ns == before.st_mtime_ns and path.stat().st_size == before.st_size


def test_a_same_size_change_of_the_weights_is_a_new_model(tmp_path):
    folder = model_folder(tmp_path / "m")
    first = model_identity(str(folder), "m", None)
    rm_first = weights_fingerprint(folder)
    rewrite_keeping_size_and_mtime(folder / "model.safetensors", b"\2" * 4096)  # a same-size fine-tune
    assert model_identity(str(folder), "m", None) != first
    assert weights_fingerprint(folder) != rm_first  # the transformers reward model too
    assert launched_identity("m", LaunchSpec(model=str(folder), dtype="float32")) == model_identity(str(folder), "m", None)


def test_an_unchanged_folder_keeps_its_identity_and_is_hashed_once(tmp_path, monkeypatch):
    folder = model_folder(tmp_path / "m")
    hashed = []
    real = identity._sha256_file
    monkeypatch.setattr(identity, "_sha256_file", lambda p: hashed.append(Path(p).name) or real(p))
    first = model_identity(str(folder), "m", None)
    assert sorted(hashed) == ["config.json", "model.safetensors", "tokenizer.json"]
    cache = tmp_path / "toa-home" / "identity" / "file-digests.json"
    assert len(json.loads(cache.read_text())) == 3  # under TOA_HOME, one entry per file
    hashed.clear()
    assert model_identity(str(folder), "m", None) == first
    assert len(weights_fingerprint(folder)) == 12  # the reward-model path reads the same cache
    assert hashed == []  # every digest came from the cache
    (folder / "tokenizer.json").write_text('{"version": "1.1"}')  # a tokenizer edit is a new model
    assert model_identity(str(folder), "m", None) != first and hashed == ["tokenizer.json"]


def test_files_that_do_not_change_what_the_model_computes_are_not_hashed(tmp_path):
    folder = model_folder(tmp_path / "m")
    before = folder_digest(folder)
    (folder / "README.md").write_text("a model card")
    (folder / ".toa-converted").write_text("ok")
    assert folder_digest(folder) == before
    (folder / "chat_template.jinja").write_text("{{ messages }}")
    assert folder_digest(folder) != before
    assert folder_digest("org/some-hub-model") is None  # not a local path: vLLM resolves it
    assert model_identity("org/some-hub-model", "m", None).startswith("m@sha256:")


# ---------------------------------------------------------------------- attached endpoints

def test_a_model_changed_behind_the_same_url_and_name_is_refused_until_accepted(tmp_path, stub):
    root = tmp_path / "results"
    cfg = attached_cfg(root, stub.url)
    [first] = verify_attached(cfg, endpoints_of(cfg), run="run-1")
    assert first.outcome == "recorded" and record_of(root)["fingerprint"] == first.fingerprint
    new_process()
    assert [c.outcome for c in verify_attached(cfg, endpoints_of(cfg), run="run-2")] == ["same"]

    stub.text, stub.logprobs = "smiled at the sea", [-0.2, -0.9, -2.0]  # redeployed: same URL, same name
    new_process()
    with pytest.raises(ModelChanged) as refused:
        verify_attached(cfg, endpoints_of(cfg), run="run-3")
    message = str(refused.value)
    now = fingerprint(endpoints_of(cfg)["a"]).value
    for part in ("agent 'a'", stub.url, "model 'm'", first.fingerprint, now, "--accept-changed-model a",
                 "accept_changed_models", "revision"):
        assert part in message, (part, message)
    assert record_of(root)["fingerprint"] == first.fingerprint  # a refusal changes no record

    accepting = attached_cfg(root, stub.url, accept_changed_models=["a"])
    assert accepting.fingerprint_fields() == cfg.fingerprint_fields()  # operational: the same run
    new_process()
    [accepted] = verify_attached(accepting, endpoints_of(accepting), run="run-4")
    assert (accepted.outcome, accepted.previous, accepted.fingerprint) == ("accepted", first.fingerprint, now)
    record = record_of(root)
    [change] = record["accepted_changes"]
    assert record["fingerprint"] == now and (change["old"], change["new"], change["run"]) == (first.fingerprint, now, "run-4")
    assert change["alias"] == "a" and "@" in change["by"] and change["at"].startswith("20")
    assert change["new_answer"]["text"] == "smiled at the sea"
    [again] = verify_attached(accepting, endpoints_of(accepting), run="run-4")  # the flow after its head start
    assert again == accepted and len(record_of(root)["accepted_changes"]) == 1  # reported again, recorded once
    new_process()
    assert [c.outcome for c in verify_attached(cfg, endpoints_of(cfg), run="run-5")] == ["same"]  # the new model is the recorded one


def test_logprob_noise_below_the_rounding_keeps_the_fingerprint(tmp_path, stub):
    root = tmp_path / "results"
    cfg = attached_cfg(root, stub.url)
    verify_attached(cfg, endpoints_of(cfg), run="r")
    stub.logprobs = [lp + 0.004 for lp in stub.logprobs]  # batch noise on a GPU server
    new_process()
    assert [c.outcome for c in verify_attached(cfg, endpoints_of(cfg), run="r")] == ["same"]
    stub.logprobs = [lp - 0.1 for lp in stub.logprobs]  # noise across a rounding boundary: one step
    new_process()
    assert [c.outcome for c in verify_attached(cfg, endpoints_of(cfg), run="r")] == ["same"]
    stub.logprobs = [-0.01, -0.52, -2.3]  # one token 1 nat less likely: another model
    new_process()
    with pytest.raises(ModelChanged):
        verify_attached(cfg, endpoints_of(cfg), run="r")


def test_one_probe_per_endpoint_per_run_and_a_mismatch_is_probed_again(tmp_path, stub):
    root = tmp_path / "results"
    cfg = attached_cfg(root, stub.url)
    verify_attached(cfg, endpoints_of(cfg), run="head start")
    verify_attached(cfg, endpoints_of(cfg), run="flow")  # the flow after the head start, same process
    assert stub.probes() == 1
    body = stub.requests[0][1]
    assert (body["temperature"], body["seed"], body["max_tokens"], body["logprobs"]) == (0, 0, 8, True)

    stub.text = "something else"
    new_process()
    with pytest.raises(ModelChanged):
        verify_attached(cfg, endpoints_of(cfg), run="r")
    assert stub.probes() == 1 + identity.MAX_PROBES  # a mismatch is confirmed before it counts


def test_revision_is_part_of_the_identity_and_of_the_run(tmp_path, stub):
    root = tmp_path / "results"
    plain = attach("a", AttachSpec(base_url=stub.url, model="m"))
    v2 = attach("a", AttachSpec(base_url=stub.url, model="m", revision="2026-11-30"))
    assert plain.identity == f"attach:{stub.url}:m" and v2.identity == f"attach:{stub.url}:m@2026-11-30"
    assert "revision" not in AttachSpec(base_url=stub.url, model="m").fingerprint()  # old run ids stay
    assert AttachSpec(base_url=stub.url, model="m", revision="2").fingerprint()["revision"] == "2"
    store = Store(str(root))
    check_endpoint(store, "a", plain)
    stub.text = "a declared new model"
    new_process()
    assert check_endpoint(store, "a", v2).outcome == "recorded"  # its own record: nothing to refuse
    assert len(list((root / "identity" / "endpoints").glob("*.json"))) == 2


def test_attached_reward_models_are_checked_too(tmp_path, stub):
    root = tmp_path / "results"
    judge = load_config(None, {"results_root": str(root), "agents": [{"alias": "a", "endpoint": {"base_url": stub.url, "model": "m"}}],
                               "reward": {"kind": "judge", "endpoint": {"base_url": stub.url, "model": "judge-m"}}})
    classify = judge.model_copy(update={"reward": judge.reward.model_copy(update={"kind": "vllm"})})
    assert [(c.alias, c.outcome) for c in verify_attached(judge, endpoints_of(judge), run="r")] == [("a", "recorded"), ("reward", "recorded")]
    assert verify_attached(classify, {}, run="r")[0].outcome == "recorded"  # /classify: its own record
    assert any(path.endswith("/classify") for path, _ in stub.requests)
    stub.text, stub.scores = "changed", [3.5]
    new_process()
    with pytest.raises(ModelChanged, match="the reward model at .*--accept-changed-model reward"):
        verify_attached(classify, {}, run="r")
    accepting = classify.model_copy(update={"accept_changed_models": ["reward"]})
    assert verify_attached(accepting, {}, run="r")[0].outcome == "accepted"


def test_a_server_failing_the_probe_is_unchecked_and_a_refusal_is_a_user_error(tmp_path, stub, monkeypatch):
    monkeypatch.setattr(sys.modules["toa.servers.attach"], "PROBE_BACKOFF_S", 0.0)  # toa.servers.attach is also a function
    cfg = attached_cfg(tmp_path / "results", stub.url)
    stub.status = 503  # failing now: its calls become error rows; the run is not stopped for it
    [checked] = verify_attached(cfg, endpoints_of(cfg), run="r")
    assert checked.outcome == "unchecked" and "HTTP 503" in checked.note and stub.probes() == 3
    assert not (tmp_path / "results" / "identity").exists()  # nothing recorded from no answer
    stub.status = 404  # the model is not served there: a setting to fix
    with pytest.raises(ProbeFailed, match="HTTP 404"):
        verify_attached(cfg, endpoints_of(cfg), run="r")


def test_accepting_an_unknown_alias_is_a_config_error(tmp_path, stub):
    with pytest.raises(ConfigError, match="accept_changed_models names no agent .'b'."):
        attached_cfg(tmp_path, stub.url, accept_changed_models=["b"])


# ---------------------------------------------------------------------- `toa run`, as a user runs it

def run_file(tmp_path: Path, url: str, limit: int, accept: bool = False) -> Path:
    lines = [f"results_root = {json.dumps(str(tmp_path / 'results'))}", 'methods = ["random"]', "n = 1",
             "batch_size = 2", "task_retries = 0", "[prompts]", f"limit = {limit}", "[reward]", 'kind = "custom"',
             'function = "openai_double:length"',
             "[[agents]]", 'alias = "a"', "[agents.endpoint]", f'base_url = "{url}"', 'model = "m"',
             f'api_key = "{KEY}"', "[agents.sampling]", "max_tokens = 8"]
    if accept:
        lines.insert(0, 'accept_changed_models = ["a"]')
    path = tmp_path / f"run-{limit}-{accept}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def sample_shards(root: Path) -> list[Path]:
    return [f for f in (root / "samples").rglob("*.parquet") if f.name != "_schema.parquet"]


def toa_run(path: Path) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PYTHONPATH"] = str(Path(__file__).parent)  # the reward function in tests/openai_double.py
    proc = subprocess.run([sys.executable, "-m", "toa.cli", "run", "--no-progress", "--config", str(path)],
                          check=False, env=env, capture_output=True, text=True, timeout=240)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.mark.integration
def test_toa_run_refuses_to_replay_a_changed_model_and_goes_on_when_told(tmp_path, stub):
    root = tmp_path / "results"
    cfg = load_config(run_file(tmp_path, stub.url, limit=2))
    [first] = verify_attached(cfg, endpoints_of(cfg), run="earlier")  # what an earlier run recorded
    stub.text = "smiled at the sea"  # redeployed behind the same URL and name
    code, out = toa_run(run_file(tmp_path, stub.url, limit=2))
    assert code == 2, out[-3000:]
    assert "Traceback" not in out and first.fingerprint in out and "--accept-changed-model a" in out, out[-3000:]
    assert sample_shards(root) == []  # nothing sampled, nothing replayed into a sample
    assert [b for _, b in stub.requests if b.get("messages") != PROBE_MESSAGES] == []  # no call made

    code, out = toa_run(run_file(tmp_path, stub.url, limit=2, accept=True))
    assert code == 0, out[-3000:]
    assert "accepted by accept_changed_models" in out, out[-3000:]
    record = record_of(root)
    assert [c["old"] for c in record["accepted_changes"]] == [first.fingerprint] and record["fingerprint"] != first.fingerprint
    assert len(sample_shards(root)) == 1  # the run went on
