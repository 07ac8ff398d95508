"""Config loading: precedence, one message for every bad field, the run fingerprint."""

from __future__ import annotations

import pytest

from toa.config import ConfigError, load_config
from toa.plan import run_id


def test_defaults_are_the_embedded_cpu_run():
    cfg = load_config()
    assert [a.alias for a in cfg.agents] == ["smollm2", "gemma3"]
    assert cfg.agents[0].launch.model == "embedded:smollm2-135m-instruct"
    assert cfg.reward.kind == "similarity" and cfg.methods == ["random", "parallel_ensemble"]
    assert cfg.budget == cfg.n * 2 and cfg.rejected_rank >= 2


def test_precedence_file_then_env_then_overrides(tmp_path, monkeypatch):
    run = tmp_path / "run.toml"
    run.write_text('n = 3\nseed = 5\nmethods = ["random"]\n[reward]\nkind = "math"\n')
    assert load_config(run).n == 3
    monkeypatch.setenv("TOA_N", "4")
    monkeypatch.setenv("TOA_REWARD__KIND", "similarity")
    cfg = load_config(run)
    assert (cfg.n, cfg.seed, cfg.reward.kind, cfg.methods) == (4, 5, "similarity", ["random"])
    cfg = load_config(run, {"n": 6, "prompts.limit": 2})
    assert (cfg.n, cfg.prompts.limit) == (6, 2)


def test_yaml_run_file(tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text("agents:\n  - alias: hosted\n    endpoint: {base_url: 'http://127.0.0.1:9/v1', model: m, api_key_env: MY_KEY}\n")
    cfg = load_config(run)
    assert cfg.agents[0].endpoint.api_key_env == "MY_KEY"


def test_bad_config_names_every_bad_field_at_once(tmp_path):
    run = tmp_path / "bad.toml"
    run.write_text('n = "many"\nseed = 1.5\n[[agents]]\nalias = "x"\n[agents.sampling]\ntemperature = "hot"\n')
    with pytest.raises(ConfigError) as err:
        load_config(run)
    msg = str(err.value)
    assert str(run) in msg
    for where in ("n:", "seed:", "agents.0.sampling.temperature:"):
        assert where in msg, msg
    assert '"hot"' in msg and "3 problem(s)" in msg


def test_agent_needs_exactly_one_server_source():
    with pytest.raises(ConfigError, match="agent 'x' needs exactly one of launch, endpoint, block"):
        load_config(overrides={"agents": [{"alias": "x"}]})


def test_unknown_method_and_duplicate_alias():
    with pytest.raises(ConfigError, match="unknown method"):
        load_config(overrides={"methods": ["random", "nope"]})
    agent = {"alias": "a", "endpoint": {"base_url": "http://127.0.0.1:1/v1", "model": "m"}}
    with pytest.raises(ConfigError, match="aliases must be unique"):
        load_config(overrides={"agents": [agent, agent]})


def test_fingerprint_follows_result_fields_only():
    base = run_id(load_config())
    same = [{"results_root": "/elsewhere"}, {"prompt_concurrency": 3}, {"task_retries": 0}, {"name": "nightly"}]
    for ov in same:
        assert run_id(load_config(overrides=ov)) == base, ov
    changed = [{"n": 3}, {"seed": 1}, {"methods": ["random"]}, {"reward.kind": "math"}, {"prompts.limit": 4}]
    for ov in changed:
        assert run_id(load_config(overrides=ov)) != base, ov


def test_agent_operational_fields_do_not_change_the_fingerprint():
    def agents(**extra):
        return [{"alias": "a", "endpoint": {"base_url": "http://127.0.0.1:1/v1", "model": "m"}, **extra}]
    base = run_id(load_config(overrides={"agents": agents()}))
    assert run_id(load_config(overrides={"agents": agents(max_concurrency=2, timeout_s=5, retries=0)})) == base
    assert run_id(load_config(overrides={"agents": agents(sampling={"temperature": 0.1})})) != base


def test_secrets_never_enter_the_fingerprint_or_the_dump():
    agent = [{"alias": "a", "endpoint": {"base_url": "http://127.0.0.1:1/v1", "model": "m", "api_key": "sk-PLANTED"}}]
    cfg = load_config(overrides={"agents": agent})
    assert "sk-PLANTED" not in repr(cfg.fingerprint_fields()) and "sk-PLANTED" not in cfg.model_dump_json()
