"""toa's Prefect blocks on a real (temporary) Prefect API: a run names a RewardModel block
(`reward.block`) or a ResultsLocation block (`results_block`) instead of inline values; the
flow resolves them before the fingerprint is taken; secrets stay SecretStr (never in config
dumps, the API shows them obfuscated) and reach only the code that needs them."""

from __future__ import annotations

import pytest
from toa.blocks import ModelEndpoint, ResultsLocation, RewardModel
from toa.blocks.resolve import resolve_blocks, resolve_results

from toa.config import ConfigError, load_config
from toa.plan import run_id
from toa.run_file import results_location
from toa.storage import Store


@pytest.fixture(scope="module")
def saved_blocks(prefect_api):
    RewardModel(kind="judge", base_url="http://judge:8000/v1", served_model="judge-7b",
                api_key="sk-judge-secret", options={"max_concurrency": 3}).save("t-judge", overwrite=True)
    ResultsLocation(url="memory://toa-block-test/results", storage_options={"skip_instance_cache": True},
                    credentials={"token": "tok-secret"}).save("t-results", overwrite=True)
    return True


@pytest.mark.integration
def test_reward_block_resolves_to_the_inline_config(saved_blocks):
    cfg = resolve_blocks(load_config(None, {"reward.block": "t-judge", "reward.retries": 5}))
    inline = load_config(None, {"reward": {"kind": "judge", "max_concurrency": 3, "retries": 5,
                                           "endpoint": {"base_url": "http://judge:8000/v1", "model": "judge-7b"}}})
    assert cfg.reward.kind == "judge" and cfg.reward.block is None
    assert cfg.reward.endpoint.api_key.get_secret_value() == "sk-judge-secret"
    assert cfg.reward.retries == 5 and cfg.reward.max_concurrency == 3  # fields beside the block win
    assert run_id(cfg) == run_id(inline)  # the fingerprint is the reward's, not the block name's
    assert "sk-judge-secret" not in cfg.model_dump_json()


def test_a_block_kind_is_not_checked_before_resolution():
    # kind='judge' with no endpoint is fine while a block is named (it supplies the server)
    assert load_config(None, {"reward.block": "x", "reward.kind": "judge"}).reward.block == "x"
    with pytest.raises(ConfigError, match="judge"):
        load_config(None, {"reward.kind": "judge"})


@pytest.mark.integration
def test_results_block_supplies_root_and_secret_options(saved_blocks):
    cfg = resolve_blocks(load_config(None, {"results_block": "t-results", "storage_options": {"extra": 1}}))
    assert cfg.results_root == "memory://toa-block-test/results"
    assert cfg.storage_options["extra"] == 1 and cfg.storage_options["skip_instance_cache"] is True
    assert cfg.storage_options["token"].get_secret_value() == "tok-secret"
    assert "tok-secret" not in cfg.model_dump_json() and "tok-secret" not in repr(cfg)
    store = Store(cfg.results_root, cfg.storage_options)  # unwrapped only to open the filesystem
    assert store.fs.storage_options["token"] == "tok-secret"
    assert run_id(cfg) == run_id(load_config(None, {}))  # where results go is operational


@pytest.mark.integration
def test_results_fields_alone_resolve_the_block_as_the_run_does(saved_blocks, tmp_path, monkeypatch):
    """`toa sql`/`report`/`export` without --root read only the results fields (toa.run_file)."""
    run_file = tmp_path / "run.toml"
    run_file.write_text('results_block = "t-results"\n')
    monkeypatch.setenv("TOA_STORAGE_OPTIONS__EXTRA", "1")
    alone = resolve_results(results_location(run_file))
    whole = resolve_blocks(load_config(run_file))
    assert (alone.results_root, alone.storage_options) == (whole.results_root, whole.storage_options)
    assert alone.storage_options["token"].get_secret_value() == "tok-secret"
    assert alone.storage_options["extra"] == "1"


@pytest.mark.integration
def test_missing_block_is_a_config_error_naming_it(saved_blocks):
    with pytest.raises(ConfigError, match=r"reward.block 'nope'.*RewardModel"):
        resolve_blocks(load_config(None, {"reward.block": "nope"}))
    with pytest.raises(ConfigError, match=r"results_block 'gone'.*ResultsLocation"):
        resolve_blocks(load_config(None, {"results_block": "gone"}))


@pytest.mark.integration
def test_invalid_reward_block_names_the_block_and_field(saved_blocks):
    RewardModel(kind="judge", base_url="http://judge:8000/v1").save("t-judge-no-model", overwrite=True)
    with pytest.raises(ConfigError, match=r"t-judge-no-model.*endpoint.model"):
        resolve_blocks(load_config(None, {"reward.block": "t-judge-no-model"}))


@pytest.mark.integration
def test_secrets_are_obfuscated_in_the_api(saved_blocks):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        doc = client.read_block_document_by_name("t-judge", block_type_slug="toa-reward-model", include_secrets=False)
        loc = client.read_block_document_by_name("t-results", block_type_slug="toa-results-location",
                                                 include_secrets=False)
    assert "sk-judge-secret" not in str(doc.data) and "tok-secret" not in str(loc.data)
    assert RewardModel.load("t-judge").api_key.get_secret_value() == "sk-judge-secret"


@pytest.mark.integration
def test_endpoint_block_gives_an_attach_spec(prefect_api):
    ModelEndpoint(base_url="http://h:1/v1", model="m", api_key="k-1").save("t-ep", overwrite=True)
    spec = ModelEndpoint.load("t-ep").attach_spec()
    assert (spec.base_url, spec.model, spec.api_key.get_secret_value()) == ("http://h:1/v1", "m", "k-1")
