"""Bad input: each case ends in a clear message naming what to fix, or in a
recorded row error, and nothing good is lost with it.

The prompt reader's row checks (every bad kind, both on_bad_row modes, CSV and Parquet) are in
tests/test_prompts.py and the config messages in tests/test_config.py; this file checks the
same cases where a run meets them: the prompt-loading task (every good row reaches a batch,
every bad one is a `skipped_rows` row), the command line (a bad config exits 2 before Prefect
starts), attaching to a server, the results root, and a prompt longer than the model's context
on a real vLLM server (integration)."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from toa.config import ConfigError, load_config
from toa.db import query
from toa.prompts import BadPromptRow
from toa.storage import Store

GOOD = [{"id": f"g{i}", "prompt": f"good question {i}"} for i in range(5)]


def mixed_jsonl(path: Path) -> Path:
    """Five good rows with every kind of bad row between them (lines 2, 4, 5, 7, 8, 10)."""
    good = [json.dumps(r).encode() for r in GOOD]
    lines = [good[0], b'{"prompt": "unclosed', good[1], b'{"text": "no prompt field"}', b'{"prompt": ""}',
             good[2], b'{"id": "g0", "prompt": "duplicate id"}', b'{"prompt": "bad \xff byte"}', good[3],
             b'["not", "an", "object"]', good[4]]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def load_batches(cfg):
    from prefect.logging import disable_run_logger
    from toa.tasks.prompts import load_prompt_batches, read_batch

    with disable_run_logger():
        batches = load_prompt_batches.fn(cfg)
    store = Store(cfg.results_root)
    return [p for b in batches for p in read_batch(store, b)]


def test_bad_rows_are_skipped_with_line_and_reason_and_no_good_row_is_lost(tmp_path):
    source = mixed_jsonl(tmp_path / "prompts.jsonl")
    cfg = load_config(overrides={"prompts": {"path": str(source), "on_bad_row": "skip"}, "batch_size": 2,
                                 "results_root": str(tmp_path / "results")})
    prompts = load_batches(cfg)
    assert [(p.prompt_id, p.line) for p in prompts] == [("g0", 1), ("g1", 3), ("g2", 6), ("g3", 9), ("g4", 11)]
    skipped = query(Store(cfg.results_root), "select line, reason from skipped_rows order by line").rows()
    assert [line for line, _ in skipped] == [2, 4, 5, 7, 8, 10]
    reasons = dict(skipped)
    assert reasons[2].startswith("invalid JSON")
    assert reasons[4] == "missing field 'prompt' (prompts.text_field); the row has 'text': set prompts.text_field = 'text'"
    assert reasons[5] == "field 'prompt' is empty" and reasons[7] == "duplicate prompt_id 'g0'"
    assert reasons[8].startswith("invalid UTF-8") and reasons[10] == "row is not a JSON object (got list)"
    assert len(prompts) + len(skipped) == len(source.read_bytes().splitlines())  # every row accounted for


def test_bad_row_in_fail_mode_names_file_line_and_reason(tmp_path):
    source = mixed_jsonl(tmp_path / "prompts.jsonl")
    cfg = load_config(overrides={"prompts.path": str(source), "results_root": str(tmp_path / "results")})
    assert cfg.prompts.on_bad_row == "fail"
    with pytest.raises(BadPromptRow, match=r"^prompts\.jsonl:2: invalid JSON"):
        load_batches(cfg)


def run_cli(*argv: str) -> tuple[int, str]:
    """`toa ...` in this process (no Prefect is started before the config is valid)."""
    import contextlib
    import io

    from toa.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exit_:
        main(list(argv))
    return exit_.value.code, err.getvalue()


def test_cli_rejects_a_config_with_wrong_types_before_starting_anything(tmp_path, monkeypatch):
    run = tmp_path / "run.toml"
    run.write_text('n = "many"\nbatch_size = -1\n[reward]\nretries = "x"\n')
    code, err = run_cli("run", "--config", str(run))
    assert code == 2 and "3 problem(s)" in err and str(run) in err
    assert "n: Input should be a valid integer" in err and "batch_size: Input should be greater than 0" in err
    assert "reward.retries:" in err
    monkeypatch.setenv("TOA_SEED", "not-a-number")
    code, err = run_cli("run", "--set", "n=2")
    assert code == 2 and "seed: Input should be a valid integer" in err and '"not-a-number"' in err


@pytest.mark.parametrize("overrides,message", [
    ({"methods": ["random", "toa_typo"]}, "unknown method(s) ['toa_typo']"),
    ({"method_options": {"tao": {"width": 2}}}, "method_options for unknown method(s) ['tao']"),
    ({"method_options": {"toa": {"widht": 2}}}, "method_options.toa: "),
    ({"agents.gemma.sampling.max_tokens": 8}, "no agent with alias 'gemma'; agents: smollm2, gemma3"),
    ({"agents": [{"alias": "bad alias!", "endpoint": {"base_url": "http://h/v1", "model": "m"}}]}, "agents.0.alias"),
])
def test_unknown_names_fail_before_the_run_with_a_message_naming_them(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=overrides)
    assert message in str(err.value)


def test_an_agent_alias_selects_its_item_in_a_dotted_override():
    cfg = load_config(overrides={"agents.gemma3.sampling.max_tokens": 8})
    assert [a.sampling.max_tokens for a in cfg.agents] == [128, 8]


def test_unreachable_endpoint_fails_at_attach_naming_the_alias_and_url():
    from toa.tasks.servers import attach_endpoint

    from toa.config import AgentConfig

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    agent = AgentConfig(alias="remote", endpoint={"base_url": url, "model": "m"})
    with pytest.raises(ConnectionError, match=rf"server 'remote': cannot reach {url} \(ConnectError\)"):
        attach_endpoint.fn(agent)


def test_results_root_without_write_permission_fails_first_naming_the_setting(tmp_path):
    # Running as root ignores permission bits, so the root sits below a regular file instead.
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    root = str(blocker / "results")
    with pytest.raises(PermissionError, match=r"cannot write to results_root '.*a-file/results'"):
        Store(root).init_tables()


@pytest.mark.integration
def test_prompt_longer_than_the_context_is_a_row_error_and_the_batch_goes_on(embedded_servers, tmp_path):
    """A real vLLM server (max_model_len 2048) answers 400 to an over-long prompt: that call is
    not retried, its samples are error rows with the server's reason, the other prompt of the
    batch is sampled as usual, and nothing is marked done."""
    from helpers import attached_agents

    from toa.engine import close_engines, run_batch
    from toa.plan import RunPlan
    from toa.rows import Prompt

    cfg = load_config(overrides={
        "agents": attached_agents({"smollm2": embedded_servers["smollm2"]}, max_tokens=8), "methods": ["random"],
        "n": 2, "results_root": str(tmp_path), "reward": {"kind": "custom", "function": "openai_double:length"}})
    prompts = [Prompt("short", "Name a colour."), Prompt("long", "word " * 5000)]
    try:
        stats = run_batch(RunPlan(cfg, cfg.method_objects, "r1"), dict(embedded_servers), "random", "b0", prompts)
    finally:
        close_engines()
    store = Store(str(tmp_path))
    rows = query(store, "select prompt_id, status, error from samples order by prompt_id").rows()
    assert [(p, s) for p, s, _ in rows] == [("long", "error")] * 2 + [("short", "ok")] * 2
    assert rows[0][2].startswith("BadRequestError 400") and "context" in rows[0][2].lower(), rows[0][2]
    assert stats.calls_failed == 2 and stats.calls_made == 2 and stats.failed
    attempts = query(store, "select prompt_id, count(*) as n from call_attempts group by 1 order by 1").rows()
    assert attempts == [("long", 2), ("short", 2)]  # one request each (n=2): the 400 was not retried
    assert not store.exists("done", "run=r1", "method=random", "b0.json")


# -- the command line: one message, exit status 2, no traceback ----------------
def toa_cli(*argv: str, cwd: Path) -> tuple[int, str]:
    """`toa` as a user runs it: its own process, its own output."""
    import subprocess
    import sys

    env = {k: v for k, v in __import__("os").environ.items() if k != "PREFECT_API_URL"}
    proc = subprocess.run([sys.executable, "-m", "toa.cli", *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)
    return proc.returncode, proc.stdout + proc.stderr


def dead_url() -> str:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/v1"


@pytest.mark.parametrize("case", ["wrong shape", "missing file", "unreachable endpoint", "toa width", "bad --set"])
def test_user_errors_are_one_message_and_exit_2_before_anything_starts(tmp_path, case):
    wrong = tmp_path / "bad.jsonl"
    wrong.write_text('{"instruction": "say hi", "output": "hi"}\n' * 3)
    argv, expected = {
        "wrong shape": (["--set", f"prompts.path={wrong}"],
                        "bad.jsonl:1: missing field 'prompt' (prompts.text_field); the row has 'instruction', 'output': "
                        "set prompts.text_field = 'instruction'"),
        "missing file": (["--set", f"prompts.path={tmp_path / 'nope.jsonl'}"], "prompts.path: no such file"),
        "unreachable endpoint": (["--set", 'agents=[{"alias": "remote", "endpoint": {"base_url": "' + dead_url()
                                  + '", "model": "m"}}]'], "server 'remote': cannot reach http://127.0.0.1:"),
        "toa width": (["--set", 'methods=["toa"]'], "Fix: set method_options.toa.width >= 2, or n >= 3"),
        "bad --set": (["--set", "n"], "--set expects key=value, got 'n'"),
    }[case]
    code, out = toa_cli("run", *argv, cwd=tmp_path)
    assert code == 2, out
    assert expected in out and "Traceback" not in out, out
    assert len(out.strip().splitlines()) <= 3, out  # one message (a config error lists its fields)
    assert not (tmp_path / "results" / "logs").exists()  # nothing started: no server, no Prefect API


def test_debug_shows_the_traceback(tmp_path):
    code, out = toa_cli("run", "--debug", "--set", f"prompts.path={tmp_path / 'nope.jsonl'}", cwd=tmp_path)
    assert code == 2 and "Traceback" in out and "prompts.path: no such file" in out


@pytest.mark.integration
def test_a_bad_row_found_inside_the_flow_is_one_message_and_exit_2(tmp_path):
    """A bad row past the head the pre-flight check reads: the flow's prompt-loading task finds
    it; the terminal still shows one message and no traceback, and exit status 2."""
    rows = [json.dumps({"prompt": f"question {i}"}) for i in range(150)] + ['{"prompt": ']
    source = tmp_path / "long.jsonl"
    source.write_text("\n".join(rows) + "\n")
    code, out = toa_cli("run", "--set", f"prompts.path={source}", "--no-progress", cwd=tmp_path)
    assert code == 2, out[-3000:]
    assert out.count("long.jsonl:151: invalid JSON") >= 1 and "Traceback" not in out, out[-3000:]
