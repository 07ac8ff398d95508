"""Request layer unit tests. The HTTP side is an in-process fake (the transport FakeServer
below) so retries, n>1 and the cache can be checked exactly and fast; the real
vLLM server is exercised by tests/test_flow_integration.py."""

from __future__ import annotations

import json

import pytest
from pydantic import SecretStr

from toa.calls import CallLayer, ClientPolicy, EndpointClient
from toa.rows import ERROR, OK
from toa.servers import Endpoint

ENDPOINT = Endpoint(alias="a", base_url="http://fake/v1", model="m", api_key=SecretStr("k"), identity="fake-model")


class FakeServer:
    """Answers chat completions; `fail` is a list of HTTP statuses to return first, in order."""

    def __init__(self, fail=(), supports_logprobs=True):
        self.fail = list(fail)
        self.requests: list[dict] = []
        self.supports_logprobs = supports_logprobs

    async def __call__(self, url: str, content: bytes) -> tuple[int, bytes]:
        body = json.loads(content)
        self.requests.append(body)
        if self.fail:
            return self.fail.pop(0), json.dumps({"error": {"message": "boom"}}).encode()
        n = body.get("n", 1)
        k = len(self.requests)
        choices = [{
            "index": i, "finish_reason": "stop",
            "message": {"role": "assistant", "content": f"reply {k}.{i}"},
            "logprobs": {"content": [{"token": "t", "logprob": -0.1, "top_logprobs": []}] * (i + 2)}
            if body.get("logprobs") and self.supports_logprobs else None,
        } for i in range(n)]
        usage = {"prompt_tokens": 7, "completion_tokens": sum(i + 2 for i in range(n)), "total_tokens": 0}
        return 200, json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": "m",
                                "choices": choices, "usage": usage}).encode()


def make_layer(server: FakeServer, cache=None, retries=2, seed=0):
    client = EndpointClient(ENDPOINT, {"temperature": 0.7, "max_tokens": 8},
                            ClientPolicy(retries=retries, backoff_s=0.001),
                            transport=server)
    records = []
    return CallLayer({"a": client}, cache or {}, records.append, run_seed=seed), records, client


MSG = [{"role": "user", "content": "hi"}]


async def test_n_samples_in_one_request_with_exact_per_choice_tokens():
    layer, records, client = make_layer(FakeServer())
    gens = await layer.for_prompt("p1")("a", MSG, 3, logprobs=True)
    assert client.requests == 1
    assert [g.completion_tokens for g in gens] == [2, 3, 4]  # from logprobs, not an even split
    assert all(g.prompt_tokens == 7 and g.ok and not g.cached for g in gens)
    assert len({g.sample_id for g in gens}) == 3 and len(records) == 3


async def test_repeated_identical_request_gets_next_slots_and_rerun_replays_all():
    server = FakeServer()
    layer, records, _ = make_layer(server)
    gen = layer.for_prompt("p1")
    first, second = await gen("a", MSG, 2), await gen("a", MSG, 1)
    assert [r.slot for r in records] == [0, 1, 2]
    # A rerun (new layer, same record) asks the same slots in the same order: zero requests.
    cache = {r.call_key: r for r in records}
    layer2, records2, client2 = make_layer(FakeServer(), cache=cache)
    gen2 = layer2.for_prompt("p1")
    again = await gen2("a", MSG, 2) + await gen2("a", MSG, 1)
    assert client2.requests == 0 and records2 == []
    assert [g.text for g in again] == [g.text for g in first + second]
    assert all(g.cached for g in again)


async def test_key_depends_on_seed_prompt_params_and_model():
    """The call key changes with each of run seed, messages, sampling parameters (the agent's
    own and a per-request override) and model identity; the same request gets the same key on a
    second layer, also where the model is reached at another address (so it is replayed)."""
    async def key(seed=0, messages=MSG, params=None, identity="fake-model", base_url="http://fake/v1", **sampling):
        endpoint = Endpoint(alias="a", base_url=base_url, model="m", api_key=SecretStr("k"), identity=identity)
        client = EndpointClient(endpoint, params or {"temperature": 0.7, "max_tokens": 8},
                                ClientPolicy(retries=0), transport=FakeServer())
        records = []
        await CallLayer({"a": client}, {}, records.append, run_seed=seed).for_prompt("p1")("a", messages, 1, **sampling)
        return records[0].call_key, records[0].model

    base, model = await key()
    assert model == "fake-model"  # the record names the model identity the key was made with
    assert (await key())[0] == base  # deterministic: a second run replays it
    assert (await key(base_url="http://moved:9000/v1"))[0] == base  # where it is served is not what it is
    variants = {
        "seed": await key(seed=1),
        "messages": await key(messages=[{"role": "user", "content": "hello"}]),
        "temperature": await key(params={"temperature": 0.9, "max_tokens": 8}),
        "max_tokens": await key(params={"temperature": 0.7, "max_tokens": 9}),
        "override": await key(stop=["\\n"]),
        "model": await key(identity="other-model@sha256:0"),
    }
    assert variants["model"][1] == "other-model@sha256:0"
    keys = {name: k for name, (k, _) in variants.items()}
    assert base not in keys.values() and len(set(keys.values())) == len(keys), keys


async def test_transient_errors_are_retried_with_backoff():
    server = FakeServer(fail=[503, 502])
    layer, records, client = make_layer(server, retries=2)
    gens = await layer.for_prompt("p")("a", MSG, 1)
    assert client.requests == 3 and gens[0].ok and records[0].status == OK


async def test_client_errors_fail_at_once_and_are_recorded_as_rows():
    layer, records, client = make_layer(FakeServer(fail=[400]), retries=3)
    gens = await layer.for_prompt("p")("a", MSG, 2)
    assert client.requests == 1  # a 400 (e.g. prompt too long) is not transient
    assert [g.status for g in gens] == [ERROR, ERROR] and "BadRequestError 400" in gens[0].error
    assert [r.status for r in records] == [ERROR, ERROR] and records[0].text is None
    # An error is never served from the record: the next run asks again.
    layer2, records2, client2 = make_layer(FakeServer(), cache={r.call_key: r for r in records})
    again = await layer2.for_prompt("p")("a", MSG, 2)
    assert client2.requests == 1 and all(g.ok for g in again)


async def test_retries_exhausted_become_error_rows():
    layer, records, client = make_layer(FakeServer(fail=[500] * 5), retries=1)
    gens = await layer.for_prompt("p")("a", MSG, 1)
    assert client.requests == 2 and gens[0].status == ERROR and layer.failed["a"] == 1


async def test_concurrent_identical_slots_are_made_once():
    import asyncio

    server = FakeServer()
    layer, records, client = make_layer(server)
    # Two prompts' callers would never share slots, but two methods on one layer can ask the
    # same prompt's first slot at once: it is requested once.
    g1, g2 = layer.for_prompt("p"), layer.for_prompt("p")
    a, b = await asyncio.gather(g1("a", MSG, 1), g2("a", MSG, 1))
    assert client.requests == 1 and a[0].sample_id == b[0].sample_id and len(records) == 1


async def test_without_logprobs_the_total_is_split_by_text_length():
    server = FakeServer()
    layer, _, _ = make_layer(server)
    gens = await layer.for_prompt("p")("a", MSG, 2)
    assert "logprobs" not in server.requests[-1]  # not asked for unless a method needs them
    assert [g.completion_tokens for g in gens] == [3, 2]  # 5 in all, equal texts: 2.5 each, rounded to add up
    assert all(g.logprob is None for g in gens)


async def test_unknown_agent_is_a_clear_error():
    layer, _, _ = make_layer(FakeServer())
    with pytest.raises(KeyError, match="unknown agent 'zz'"):
        await layer.for_prompt("p")("zz", MSG, 1)


async def test_logprobs_kept_per_choice_and_replayed_from_the_record():
    layer, records, _ = make_layer(FakeServer())
    gens = await layer.for_prompt("p1")("a", MSG, 2, logprobs=True)
    assert [round(g.logprob, 6) for g in gens] == [-0.2, -0.3]  # sum over each choice's tokens
    assert round(gens[1].mean_logprob, 6) == -0.1
    replay, _, _ = make_layer(FakeServer(), cache={r.call_key: r for r in records})
    again = await replay.for_prompt("p1")("a", MSG, 2, logprobs=True)
    assert [g.logprob for g in again] == [g.logprob for g in gens] and all(g.cached for g in again)


async def test_per_request_sampling_overrides_are_sent_and_keyed_separately():
    server = FakeServer()
    layer, _, _ = make_layer(server)
    gen = layer.for_prompt("p1")
    plain = await gen("a", MSG, 1)
    step = await gen("a", MSG, 1, stop=["\n"], max_tokens=4, continue_final_message=True)
    sent = server.requests[-1]
    assert sent["stop"] == ["\n"] and sent["max_tokens"] == 4 and sent["continue_final_message"] is True
    assert sent["temperature"] == 0.7  # the agent's own fields stay unless overridden
    assert step[0].sample_id != plain[0].sample_id  # a different request is a different sample


async def test_two_aliases_of_one_model_draw_distinct_samples():
    server = FakeServer()
    layer, _, client = make_layer(server)
    layer.clients["b"] = client  # a second alias for the same endpoint and sampling
    gen = layer.for_prompt("p1")
    a, b = await gen("a", MSG, 1), await gen("b", MSG, 1)
    assert a[0].sample_id != b[0].sample_id and len(server.requests) == 2
