"""Security: API keys never appear in logs, artifacts, Parquet, DuckDB or
exceptions; launched servers bind 127.0.0.1 with a fresh random key each; SQL takes bound
parameters only.

The leak test plants a random key ("sk-toa-planted-<hex>") in three places a user keeps one (an
environment variable, a Prefect Secret block, a toa ModelEndpoint block), runs the real flow
against tests/openai_double.py (which only answers that key), and then searches for it in every
file under the results root (Parquet decoded, DuckDB views queried, other files as bytes), in
every Prefect log, artifact and flow-run parameter, and in the text of the errors toa raises or
records for an unreachable server and for a server that echoes a rejected key (as hosted APIs do).
"""

from __future__ import annotations

import ast
import asyncio
import json
import secrets
import socket
from pathlib import Path

import duckdb
import polars as pl
import pytest
from openai_double import OpenAIDouble

from toa.db import database_path, query
from toa.rows import PromptRow
from toa.storage import Store

ROOT = Path(__file__).resolve().parents[1]


def leaks_in_files(root: Path, key: str) -> list[str]:
    """Files under `root` that hold `key`: Parquet decoded (it is compressed), the DuckDB file
    as bytes and through every view, everything else as bytes."""
    found = []
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        if f.suffix == ".parquet":
            df = pl.read_parquet(f)
            if any(key in str(v) for col in df.columns for v in df[col].to_list()):
                found.append(str(f))
        elif key.encode() in f.read_bytes():
            found.append(str(f))
    return found


def leaks_in_views(store: Store, key: str) -> list[str]:
    con = duckdb.connect(str(database_path(store)), read_only=True)
    try:
        views = [r[0] for r in con.sql("select view_name from duckdb_views() where not internal").fetchall()]
        return [v for v in views if any(key in str(row) for row in con.sql(f'select * from "{v}"').fetchall())]
    finally:
        con.close()


def prefect_texts() -> list[str]:
    """Every log message, artifact and flow-run parameter set the Prefect API holds."""
    from prefect.client.orchestration import get_client

    texts = []
    with get_client(sync_client=True) as client:
        offset = 0
        while batch := client.read_logs(limit=200, offset=offset):
            texts += [f"{log.name}: {log.message}" for log in batch]
            offset += len(batch)
        texts += [json.dumps(a.data, default=str) + str(a.description) for a in client.read_artifacts()]
        texts += [json.dumps(r.parameters, default=str) + str(r.state.message if r.state else "")
                  for r in client.read_flow_runs()]
    return texts


@pytest.mark.integration
def test_planted_key_appears_nowhere(prefect_api, tmp_path, monkeypatch):
    from prefect.blocks.system import Secret
    from toa.blocks.endpoints import ModelEndpoint
    from toa.flows.synthesize import toa

    key = f"sk-toa-planted-{secrets.token_hex(12)}"
    tag = secrets.token_hex(4)
    monkeypatch.setenv("TOA_PLANTED_KEY", key)
    root = tmp_path / "results"
    with OpenAIDouble(key) as double:
        Secret(value=key).save(f"planted-secret-{tag}")
        ModelEndpoint(base_url=double.url("ok"), model="m", api_key=key).save(f"planted-endpoint-{tag}")
        agents = [
            {"alias": "via-env", "endpoint": {"base_url": double.url("ok"), "model": "m", "api_key_env": "TOA_PLANTED_KEY"}},
            {"alias": "via-secret", "endpoint": {"base_url": double.url("ok"), "model": "m", "api_key_block": f"planted-secret-{tag}"}},
            {"alias": "via-block", "block": f"planted-endpoint-{tag}"},
        ]
        result = toa(methods=["parallel_ensemble", "random"], n=1, limit=2, results_root=str(root),
                     overrides={"agents": [{**a, "sampling": {"max_tokens": 8}} for a in agents],
                                "reward": {"kind": "custom", "function": "openai_double:length"}})
        posts = [b for m, _, b in double.requests]
    assert result["failed_batches"] == [] and all(r["generation_errors"] == 0 for r in result["summary"])
    assert len(posts) == 2 * 3 + 2  # the run really used the key: 3 agents x 2 prompts, + random's 2
    assert set(double.auth_seen) == {key}  # every request (and probe) offered the planted key

    store = Store(str(root))
    assert query(store, "select count(*) as n from samples")["n"][0] == 2 * 3 * 2  # budget 3 x 2 methods
    assert any((root / "exports").rglob("*.jsonl")) and any((root / "reports").rglob("*.md"))
    assert leaks_in_files(root, key) == []
    assert leaks_in_views(store, key) == []
    texts = prefect_texts()
    assert any("parallel_ensemble" in t for t in texts)  # the search did see this run's logs
    assert [t for t in texts if key in t] == []


async def test_errors_never_carry_the_key(tmp_path):
    """A server that echoes a rejected key, and a server that is not there: neither the raised
    message (attach probe) nor the recorded call error holds the key."""
    from toa.calls import CallLayer, ClientPolicy, EndpointClient
    from toa.servers import AttachSpec, attach
    from toa.servers.attach import probe

    key = f"sk-toa-planted-{secrets.token_hex(12)}"
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    errors = []
    with OpenAIDouble("the-right-key") as double:
        for url, exc_type, words in ((double.url("ok"), PermissionError, "rejected the API key (HTTP 401)"),
                                     (dead, ConnectionError, "cannot reach")):
            endpoint = attach("remote", AttachSpec(base_url=url, model="m", api_key=key))
            with pytest.raises(exc_type) as err:
                await asyncio.to_thread(probe, endpoint, 5.0)
            assert words in str(err.value) and "'remote'" in str(err.value) and key not in str(err.value)
            records = []
            client = EndpointClient(endpoint, {"max_tokens": 4}, ClientPolicy(retries=0, timeout_s=5))
            layer = CallLayer({"remote": client}, {}, records.append, run_seed=0)
            (gen,) = await layer.for_prompt("p")("remote", [{"role": "user", "content": "hi"}], 1)
            await client.aclose()
            assert gen.status == "error" and records[0].status == "error"
            assert key not in gen.error and key not in json.dumps(records[0].__dict__)
            errors.append(gen.error)
        assert key in double.auth_seen  # the double did get (and echo) the key toa then cut out
    assert errors[0].startswith("AuthenticationError 401: ") and "**********" in errors[0]
    assert errors[1].startswith("APIConnectionError: ")


@pytest.mark.integration
def test_launched_servers_bind_loopback_with_fresh_keys_kept_out_of_argv_and_logs(embedded_servers, tmp_path_factory):
    endpoints = list(embedded_servers.values())
    keys = [ep.api_key.get_secret_value() for ep in endpoints]
    assert len(set(keys)) == len(keys) and all(len(k) >= 40 for k in keys)  # token_urlsafe(32): 43 chars
    ports = []
    for ep in endpoints:
        host, port = ep.base_url.removeprefix("http://").split("/")[0].rsplit(":", 1)
        assert host == "127.0.0.1"
        ports.append(int(port))
    # The listening sockets themselves: bound to 127.0.0.1 (0100007F), not 0.0.0.0.
    listening = {}
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        addr, port = local.split(":")
        if state == "0A":  # LISTEN
            listening.setdefault(int(port, 16), set()).add(addr)
    assert all(listening.get(p) == {"0100007F"} for p in ports), {p: listening.get(p) for p in ports}
    # The key travels in the environment only: not in any process's argv, not in the server logs.
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                argv = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            assert not any(k.encode() in argv for k in keys), proc.name
    logs = list(tmp_path_factory.getbasetemp().glob("server-logs*/*"))
    assert logs and not any(k.encode() in f.read_bytes() for f in logs if f.is_file() for k in keys)


def test_launch_host_is_loopback_unless_configured():
    from toa.servers import LaunchSpec
    from toa.servers.vllm import build_command

    def host_of(spec):
        cmd = build_command(spec, model_dir="/m", served_name="a", port=1, python="py", device="cpu",
                            chat_template_path=None)
        return cmd[cmd.index("--host") + 1]

    assert LaunchSpec(model="/m").host == "127.0.0.1" and host_of(LaunchSpec(model="/m")) == "127.0.0.1"
    assert host_of(LaunchSpec(model="/m", host="0.0.0.0")) == "0.0.0.0"


# -- SQL takes bound parameters only ------------------------------------------------------------
SQL_CALLS = {"execute", "sql", "query", "executemany"}


def _sql_calls_built_from_values(path: Path) -> list[str]:
    """Calls like con.sql(f"... {x}") or query(store, "..." + x): SQL text assembled from
    values instead of bound. The view DDL's `.replace("{root}", ...)` is the one allowed
    exception (DDL cannot take parameters; the root is quoted by toa.db._literal, and
    tests/test_storage_db.py puts a quote in the root). An identifier (a column name) cannot be
    bound either: a call that interpolates one must check it against a fixed set and say so in a
    comment containing "validated" on the call's lines."""
    bad = []
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    for node in ast.walk(ast.parse(text)):
        if not isinstance(node, ast.Call):
            continue
        name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        if name not in SQL_CALLS:
            continue
        for arg in node.args[:2]:
            built = isinstance(arg, (ast.JoinedStr, ast.BinOp)) or (
                isinstance(arg, ast.Call) and isinstance(arg.func, ast.Attribute) and arg.func.attr == "format")
            if built and "validated" not in "\n".join(lines[node.lineno - 1:node.end_lineno]):
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return bad


def test_sql_is_never_built_from_values():
    files = [p for d in ("src", "flows", "tasks", "blocks") for p in (ROOT / d).rglob("*.py")]
    assert len(files) > 20
    assert [hit for f in files for hit in _sql_calls_built_from_values(f)] == []


def test_hostile_values_are_bound_not_executed(tmp_path):
    store = Store(str(tmp_path / "it's"))
    hostile = "x' OR '1'='1"
    store.write_rows("prompts", [PromptRow("p1", "t", source="s", line=1, batch="b")], "source=s", "b.parquet")
    assert query(store, "select count(*) as n from prompts where prompt_id = ?", [hostile])["n"][0] == 0
    assert query(store, "select count(*) as n from prompts where prompt_id = ?", ["p1"])["n"][0] == 1
    assert query(store, "select ? as v", ["'); drop view prompts; --"])["v"][0].startswith("');")
    assert query(store, "select count(*) as n from prompts")["n"][0] == 1  # the view is still there


def test_storage_credentials_in_a_run_file_are_masked_wherever_the_config_is_shown():
    """storage_options of the results root and of the prompt source may carry credentials
    (s3fs key/secret, ...): the config holds them as SecretStr, so the run record
    (runs.config_json is the config's JSON), logs and Prefect see them masked, while the Store
    and the prompt reader get the plain values."""
    from toa.config import load_config
    from toa.storage import plain_options

    secret = secrets.token_hex(8)
    cfg = load_config(overrides={"storage_options": {"key": "AKIA-id", "secret": secret, "endpoint_url": "http://s3:9000"},
                                 "prompts.storage_options": {"token": secret}})
    dumped = cfg.model_dump_json()
    assert secret not in dumped and "AKIA-id" not in dumped and secret not in repr(cfg)
    assert "http://s3:9000" in dumped  # not a credential: shown as given
    assert plain_options(cfg.storage_options) == {"key": "AKIA-id", "secret": secret, "endpoint_url": "http://s3:9000"}
    assert plain_options(cfg.prompts.storage_options) == {"token": secret}
