"""Tests of the model-server layer (toa.servers).

Fast tests build commands and environments, resolve attach keys, and drive the start/stop
machinery with stand-in "servers" (tiny scripts). Integration tests start real vLLM CPU servers on
the embedded models; the vLLM interpreter comes from ensure_vllm_cpu_venv() (TOA_VLLM_PYTHON
points at an existing one during development; otherwise the venv is built once).
"""

from __future__ import annotations

import socket
import stat
import sys
import time
from pathlib import Path

import pytest
from pydantic import SecretStr

from toa.servers import (
    AttachSpec,
    Endpoint,
    LaunchSpec,
    ServerStartError,
    attach,
    ensure_embedded_model,
    ensure_vllm_cpu_venv,
    start_vllm,
)
from toa.servers.embedded import GEMMA3_CHAT_TEMPLATE
from toa.servers.vllm import build_command, build_env, free_port, group_alive

SECRET = "sk-test-do-not-show-0123456789"


# ---------------------------------------------------------------------------- fast tests

def _argv_value(cmd: list[str], flag: str) -> str:
    return cmd[cmd.index(flag) + 1]


def test_command_on_gpu_has_gpu_flags_and_visible_devices():
    spec = LaunchSpec(model="/models/m", device="cuda", gpus=[2, 3], tensor_parallel_size=2,
                      gpu_memory_utilization=0.8, dtype="bfloat16", max_model_len=4096,
                      served_model_name="m1", extra_args=["--seed", "1"])
    cmd = build_command(spec, model_dir="/models/m", served_name="m1", port=8123,
                        python="/usr/bin/python3", device="cuda", chat_template_path="/t.jinja")
    assert cmd[:3] == ["/usr/bin/python3", "-m", "vllm.entrypoints.openai.api_server"]
    assert _argv_value(cmd, "--model") == "/models/m"
    assert _argv_value(cmd, "--served-model-name") == "m1"
    assert _argv_value(cmd, "--host") == "127.0.0.1"
    assert _argv_value(cmd, "--port") == "8123"
    assert _argv_value(cmd, "--tensor-parallel-size") == "2"
    assert _argv_value(cmd, "--gpu-memory-utilization") == "0.8"
    assert _argv_value(cmd, "--dtype") == "bfloat16"
    assert _argv_value(cmd, "--max-model-len") == "4096"
    assert _argv_value(cmd, "--chat-template") == "/t.jinja"
    assert "--enforce-eager" not in cmd
    assert "--enable-per-request-metrics" not in cmd  # the user's vLLM, of any version: theirs to add
    assert cmd[-2:] == ["--seed", "1"]
    env = build_env(spec, "cuda", SECRET, base={"PATH": "/bin", "PYTHONPATH": "/x"})
    assert env["CUDA_VISIBLE_DEVICES"] == "2,3"
    assert "VLLM_CPU_KVCACHE_SPACE" not in env
    assert "PYTHONPATH" not in env  # our venv must not leak into vLLM's


def test_command_on_cpu_is_eager_with_kv_cache_space_and_key_only_in_env():
    spec = LaunchSpec(model="/models/m", device="cpu", cpu_kvcache_gib=2)
    cmd = build_command(spec, model_dir="/models/m", served_name="a", port=1, python="py",
                        device="cpu", chat_template_path=None)
    assert "--enforce-eager" in cmd and "--no-enable-chunked-prefill" in cmd
    assert "--enable-per-request-metrics" in cmd  # server seconds per call (toa's pinned vLLM CPU has it)
    assert "--gpu-memory-utilization" not in cmd
    assert "--chat-template" not in cmd
    assert not any(SECRET in a for a in cmd)
    env = build_env(spec, "cpu", SECRET, base={})
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "2"
    assert env["VLLM_API_KEY"] == SECRET
    assert "CUDA_VISIBLE_DEVICES" not in env


def test_fingerprint_hash_the_template_text(tmp_path):
    f = tmp_path / "t.jinja"
    f.write_text("{{ messages }}")
    by_file = LaunchSpec(model="m", chat_template=str(f)).fingerprint()
    literal = LaunchSpec(model="m", chat_template="{{ messages }}").fingerprint()
    other = LaunchSpec(model="m", chat_template="{{ bos_token }}{{ messages }}").fingerprint()
    assert by_file == literal
    assert by_file["chat_template_sha256"] != other["chat_template_sha256"]
    assert set(by_file) == {"model", "served_model_name", "chat_template_sha256", "dtype",
                            "max_model_len"}


def test_endpoint_repr_hides_key():
    ep = Endpoint(alias="a", base_url="http://127.0.0.1:1/v1", model="m",
                  api_key=SecretStr(SECRET), identity="m@x", supports_n=True, max_model_len=None)
    assert SECRET not in repr(ep) and SECRET not in str(ep)
    assert ep.api_key.get_secret_value() == SECRET


def test_attach_resolves_key_from_env(monkeypatch):
    monkeypatch.setenv("TOA_TEST_KEY", SECRET)
    spec = AttachSpec(base_url="http://h:8000", model="m", api_key_env="TOA_TEST_KEY",
                      supports_n=False)
    ep = attach("remote", spec)
    assert ep.api_key.get_secret_value() == SECRET
    assert ep.base_url == "http://h:8000/v1"
    assert ep.identity == "attach:http://h:8000/v1:m"
    assert ep.supports_n is False
    assert SECRET not in repr(ep)


def test_attach_key_precedence_and_default(monkeypatch):
    monkeypatch.setenv("TOA_TEST_KEY", "from-env")
    spec = AttachSpec(base_url="http://h/v1/", model="m", api_key=SecretStr("direct"),
                      api_key_env="TOA_TEST_KEY")
    assert attach("a", spec).api_key.get_secret_value() == "direct"
    keyless = attach("a", AttachSpec(base_url="http://h/v1", model="m"))
    assert keyless.api_key.get_secret_value() == "EMPTY"


def test_attach_missing_env_var_names_alias_and_var(monkeypatch):
    monkeypatch.delenv("TOA_TEST_MISSING", raising=False)
    with pytest.raises(ValueError, match=r"'judge'.*TOA_TEST_MISSING"):
        attach("judge", AttachSpec(base_url="http://h/v1", model="m",
                                   api_key_env="TOA_TEST_MISSING"))


def test_free_port_is_bindable_on_loopback():
    port = free_port("127.0.0.1")
    assert 0 < port < 65536
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", port))
        assert s.getsockname() == ("127.0.0.1", port)


def _fake_server(tmp_path: Path, body: str) -> str:
    """A stand-in interpreter: ignores vLLM's argv and runs `body` as a shell script."""
    path = tmp_path / "fake-python"
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


def test_server_that_exits_raises_with_log_tail_quickly(tmp_path):
    python = _fake_server(tmp_path, 'for i in $(seq 1 100); do echo "boot line $i"; done\n'
                                    'echo "fatal: no such model" ; exit 3')
    spec = LaunchSpec(model=str(tmp_path / "nope"), device="cpu", python=python,
                      startup_timeout_s=60)
    t0 = time.monotonic()
    with pytest.raises(ServerStartError) as err:
        start_vllm("broken", spec, tmp_path / "logs")
    assert time.monotonic() - t0 < 10  # stopped early: did not wait for the deadline
    msg = str(err.value)
    assert "exited with code 3" in msg and "fatal: no such model" in msg
    assert "boot line 100" in msg and "boot line 10\n" not in msg  # only the tail


def test_server_that_hangs_times_out_and_group_is_killed(tmp_path):
    # The child ignores SIGTERM and forks a grandchild: stop() must SIGKILL the whole group.
    # (field 5 of /proc/<pid>/stat is the process group: the guard's, which toa signals)
    python = _fake_server(tmp_path, "trap '' TERM\necho starting pgid=$(cut -d' ' -f5 /proc/$$/stat)\nsleep 300 &\nwait")
    spec = LaunchSpec(model="m", device="cpu", python=python, startup_timeout_s=2)
    t0 = time.monotonic()
    with pytest.raises(ServerStartError, match="not ready after 2 s") as err:
        start_vllm("hung", spec, tmp_path / "logs")
    msg = str(err.value)
    assert "starting pgid=" in msg
    assert time.monotonic() - t0 < 45
    pgid = int(msg.split("starting pgid=")[1].split()[0])
    assert pgid > 1 and not group_alive(pgid)


def test_stop_is_idempotent_and_ends_group(tmp_path, monkeypatch):
    # A "server" that forks a child; readiness is faked so start_vllm returns a live handle.
    python = _fake_server(tmp_path, "sleep 300 &\nsleep 300")
    monkeypatch.setattr("toa.servers.vllm._ready", lambda *a, **k: True)
    handle = start_vllm("fake", LaunchSpec(model="m", device="cpu", python=python), tmp_path, generation_probe=False)
    pgid = handle.pid
    assert group_alive(pgid)
    with handle:
        pass
    assert not group_alive(pgid)
    handle.stop()  # second stop: no error


def _fake_vllm(tmp_path: Path, chat: str) -> str:
    """tests/fake_vllm.py as the interpreter: it answers /health and /v1/models; chat as told."""
    script = Path(__file__).with_name("fake_vllm.py")
    return _fake_server(tmp_path, f'FAKE_VLLM_CHAT={chat} exec {sys.executable} {script} "$@"')


def test_a_server_that_loads_but_never_generates_fails_readiness_fast(tmp_path):
    spec = LaunchSpec(model="m", device="cpu", python=_fake_vllm(tmp_path, "never"), probe_timeout_s=2)
    t0 = time.monotonic()
    with pytest.raises(ServerStartError, match="answered /health but generated nothing within 2 s"):
        start_vllm("mute", spec, tmp_path / "logs")
    assert time.monotonic() - t0 < 30


def test_readiness_ends_with_a_real_generation_and_measures_it(tmp_path):
    spec = LaunchSpec(model="m", device="cpu", python=_fake_vllm(tmp_path, "ok"))
    with start_vllm("talks", spec, tmp_path / "logs") as handle:
        assert handle.tokens_per_s is not None and handle.tokens_per_s > 0
        assert handle.endpoint.device == "cpu" and handle.endpoint.dtype in ("bfloat16", "float32")


# ---------------------------------------------------------------------------- integration

def _openai_client(ep: Endpoint):
    from openai import OpenAI

    return OpenAI(base_url=ep.base_url, api_key=ep.api_key.get_secret_value(), timeout=300)


@pytest.fixture(scope="module")
def vllm_python() -> str:
    return str(ensure_vllm_cpu_venv())


@pytest.fixture(scope="module")
def smollm2_server(vllm_python, tmp_path_factory):
    spec = LaunchSpec(model="embedded:smollm2-135m-instruct", device="cpu", python=vllm_python)
    handle = start_vllm("smollm2", spec, tmp_path_factory.mktemp("smollm2-logs"))
    yield handle
    handle.stop()


@pytest.mark.integration
def test_embedded_conversion_is_cached():
    first = ensure_embedded_model("smollm2-135m-instruct")
    t0 = time.monotonic()
    assert ensure_embedded_model("smollm2-135m-instruct") == first
    assert time.monotonic() - t0 < 0.5
    assert (first / "config.json").is_file()


@pytest.mark.integration
def test_vllm_chat_n2_on_embedded_smollm2(smollm2_server):
    ep = smollm2_server.endpoint
    assert ep.base_url.startswith("http://127.0.0.1:") and ep.base_url.endswith("/v1")
    resp = _openai_client(ep).chat.completions.create(
        model=ep.model, n=2, max_tokens=16, temperature=1.0, logprobs=True, top_logprobs=2,
        messages=[{"role": "user", "content": "Name a colour."}])
    assert len(resp.choices) == 2
    assert all(c.message.content for c in resp.choices)
    assert resp.usage.prompt_tokens > 0 and resp.usage.completion_tokens > 0
    assert resp.choices[0].logprobs.content[0].top_logprobs


@pytest.mark.integration
def test_vllm_serves_many_concurrent_seeded_requests(smollm2_server):
    # Regression: with chunked prefill, vLLM's CPU worker crashed the engine on seeded requests
    # once several were in flight (toa sends a seed with every request).
    import asyncio

    import openai

    ep = smollm2_server.endpoint
    question = "Explain in detail how a bicycle gear system works and why it helps on hills. " * 6

    async def hammer():
        client = openai.AsyncOpenAI(base_url=ep.base_url, api_key=ep.api_key.get_secret_value(), max_retries=0)
        calls = [client.chat.completions.create(model=ep.model, n=4, seed=i, max_tokens=24, temperature=0.7,
                                                messages=[{"role": "user", "content": f"{i}. {question}"}])
                 for i in range(24)]
        return await asyncio.gather(*calls, return_exceptions=True)

    results = asyncio.run(hammer())
    failures = [r for r in results if isinstance(r, Exception)]
    assert failures == [] and all(len(r.choices) == 4 for r in results)


@pytest.mark.integration
def test_vllm_rejects_wrong_key(smollm2_server):
    import openai

    ep = smollm2_server.endpoint
    client = openai.OpenAI(base_url=ep.base_url, api_key="wrong", timeout=30)
    with pytest.raises(openai.AuthenticationError):
        client.models.list()


@pytest.mark.integration
def test_vllm_stop_ends_process_group(smollm2_server):
    # Last test on this server (file order): stop it and check the engine workers went too.
    pgid = smollm2_server.pid
    assert group_alive(pgid)
    smollm2_server.stop()
    assert not group_alive(pgid)
    smollm2_server.stop()


@pytest.mark.integration
def test_vllm_missing_model_raises_with_log_lines(vllm_python, tmp_path):
    spec = LaunchSpec(model=str(tmp_path / "no-such-model"), device="cpu", python=vllm_python,
                      startup_timeout_s=120)
    t0 = time.monotonic()
    with pytest.raises(ServerStartError) as err:
        start_vllm("missing", spec, tmp_path)
    assert time.monotonic() - t0 < 120 + 35  # deadline plus the stop grace period
    msg = str(err.value)
    assert "last lines:" in msg and len(msg.splitlines()) > 3
    assert "no-such-model" in msg


@pytest.fixture(scope="module")
def gemma_server(vllm_python, tmp_path_factory):
    spec = LaunchSpec(model="embedded:gemma3-270m", device="cpu", python=vllm_python)
    handle = start_vllm("gemma3", spec, tmp_path_factory.mktemp("gemma-logs"))
    yield handle
    handle.stop()
    assert not group_alive(handle.pid)


@pytest.mark.integration
def test_embedded_gemma_folder_has_chat_template():
    folder = ensure_embedded_model("gemma3-270m")
    assert (folder / "chat_template.jinja").read_text() == GEMMA3_CHAT_TEMPLATE


@pytest.mark.integration
def test_vllm_chat_on_embedded_gemma3(gemma_server):
    ep = gemma_server.endpoint
    resp = _openai_client(ep).chat.completions.create(
        model=ep.model, n=2, max_tokens=16, temperature=0.7,
        messages=[{"role": "system", "content": "Answer briefly."},
                  {"role": "user", "content": "What is the capital of France?"}])
    assert len(resp.choices) == 2
    assert all(c.message.content for c in resp.choices)
    assert resp.usage.completion_tokens > 0
    # The Gemma template turned the two messages into one user turn with its markers.
    assert resp.usage.prompt_tokens > 10


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
