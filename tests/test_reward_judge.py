"""The LLM judge: parsing and expectation math on hand-made logprob lists (fast), then the judge
on the real SmolLM2 vLLM CPU server (integration), including wrong-key and dead-endpoint errors."""

from __future__ import annotations

import asyncio
import math
from types import SimpleNamespace

import pytest
from pydantic import SecretStr

from toa.reward.judge import (
    JudgeReward,
    expectation,
    from_logprobs,
    from_text,
    judge_output,
    load_template,
    rating_of,
    to_score,
)
from toa.rows import ERROR, OK, Prompt
from toa.servers import Endpoint

LN = math.log


# ---------------------------------------------------------------------------- unit tests

def test_rating_tokens_are_single_digits_1_to_9():
    assert [rating_of(t) for t in ("7", " 7", "7\n", "0", "10", "x", "")] == \
        [7, 7, 7, None, None, None, None]


def test_expectation_renormalises_over_rating_tokens_and_merges_variants():
    top = [("7", LN(0.5)), (" 7", LN(0.1)), ("8", LN(0.2)), ("hello", LN(0.15)), ("0", LN(0.05))]
    value, mass = expectation(top)
    assert mass == pytest.approx(0.8)
    assert value == pytest.approx((7 * 0.6 + 8 * 0.2) / 0.8)
    assert expectation([("hi", LN(0.9)), ("10", LN(0.1))]) is None
    assert expectation([]) is None


def test_logprobs_use_the_first_rating_position():
    tokens = [(" ", [(" ", LN(0.9))]),
              ("3", [("3", LN(0.6)), ("9", LN(0.2)), ("a", LN(0.2))]),
              (".", [(".", LN(1.0))])]
    value, mass = from_logprobs(tokens)
    assert value == pytest.approx((3 * 0.6 + 9 * 0.2) / 0.8) and mass == pytest.approx(0.8)


def test_ten_split_into_two_tokens_is_off_the_scale():
    """SmolLM2 writes 10 as '1','0': not a rating 1 (logprobs) and not on the scale (text)."""
    tokens = [("1", [("1", LN(0.7)), ("9", LN(0.3))]), ("0", [("0", LN(1.0))])]
    assert from_logprobs(tokens) is None
    out = judge_output("10", tokens)
    assert out.value is None and out.via == "unparsed"
    assert to_score(out).status == ERROR and to_score(out).value is None


def test_text_fallback_without_logprobs():
    assert from_text("Rating: 7/9") == 7
    assert from_text("I give it 12") is None
    assert from_text("excellent!") is None
    out = judge_output(" 8", None)
    assert (out.value, out.mass, out.via) == (8.0, None, "text")
    score = to_score(out)
    assert score.status == OK and score.value == 8.0 and "via=text" in score.error


def test_template_puts_rubric_first_and_question_answer_last():
    tpl = load_template()
    text = tpl.render(question="QQQ", answer="AAA")
    assert text.index("impartial judge") < text.index("QQQ") < text.index("AAA")
    assert text.rstrip().endswith("## Rating (a single digit from 1 to 9)")
    assert set(tpl.fields) == {"question", "answer"} and len(tpl.sha) == 16


def _fake_endpoint(base_url="http://127.0.0.1:9/v1", key="k"):
    return Endpoint(alias="judge", base_url=base_url, model="m", api_key=SecretStr(key),
                    identity="m@sha256:0")


def test_backend_keeps_raw_outputs_and_service_records_values(monkeypatch):
    """A stand-in `_ask` (no server): values, last_outputs and the service's records."""
    from toa.reward import RewardService, reward_key

    judge = JudgeReward(_fake_endpoint())
    assert judge.identity == f"judge:m@sha256:0:tpl={load_template().sha}"
    replies = {"good": ("9", [("9", [("9", LN(0.75)), ("8", LN(0.25))])]),
               "junk": ("no idea", None)}

    async def fake_ask(question, answer):
        text, tokens = replies[answer]
        content = [SimpleNamespace(token=t, top_logprobs=[SimpleNamespace(token=a, logprob=lp)
                                                          for a, lp in top]) for t, top in tokens] \
            if tokens else None
        return SimpleNamespace(message=SimpleNamespace(content=text),
                               logprobs=SimpleNamespace(content=content) if content else None)

    monkeypatch.setattr(judge, "_ask", fake_ask)
    service = RewardService(judge, retries=0)
    prompt = Prompt("p", "Say hi")
    good, junk = asyncio.run(service.score(prompt, ["good", "junk"]))
    assert good.status == OK and good.value == pytest.approx(8.75)
    assert junk.status == ERROR and junk.value is None and "no idea" in junk.error
    kept = judge.last_outputs[reward_key(judge.identity, prompt, "good")]
    assert (kept.raw, kept.via) == ("9", "logprobs") and kept.mass == pytest.approx(1.0)


def test_config_builds_judge_and_vllm_backends_without_leaking_keys():
    from toa.reward import RewardConfig, VllmReward, build_backend

    ep = {"base_url": "http://127.0.0.1:9", "model": "m", "api_key": "sekret"}
    judge_cfg = RewardConfig(kind="judge", endpoint=ep)
    judge = build_backend(judge_cfg)
    assert isinstance(judge, JudgeReward)
    assert judge.identity.startswith("judge:attach:http://127.0.0.1:9/v1:m:tpl=")
    assert "sekret" not in repr(judge_cfg.fingerprint())
    vllm_cfg = RewardConfig(kind="vllm", endpoint=ep)
    assert build_backend(vllm_cfg).identity == "vllm:attach:http://127.0.0.1:9/v1:m"
    launched = RewardConfig(kind="vllm", launch={"model": "/models/rm"}).fingerprint()
    assert launched["launch"]["model"] == "/models/rm" and launched["endpoint"] is None
    with pytest.raises(ValueError):
        RewardConfig(kind="vllm")
    with pytest.raises(ValueError):
        VllmReward(None)


# ---------------------------------------------------------------------------- real server

QA = [("What is 2 + 2?", "2 + 2 = 4."),
      ("What is the capital of France?", "The capital of France is Paris."),
      ("What is 2 + 2?", "Bananas are yellow and I like trains.")]


@pytest.mark.integration
def test_judge_on_smollm2_uses_logprobs(embedded_servers):
    from toa.reward import RewardService, reward_key

    judge = JudgeReward(embedded_servers["smollm2"])
    service = RewardService(judge, retries=0)
    prompts = [Prompt(f"q{i}", q) for i, (q, _) in enumerate(QA)]

    async def go():
        try:
            return await asyncio.gather(*(service.score(p, [a]) for p, (_, a) in zip(prompts, QA)))
        finally:
            await judge.aclose()

    scores = [s[0] for s in asyncio.run(go())]
    assert all(s.status == OK and 1.0 <= s.value <= 9.0 for s in scores), scores
    assert service.backend_calls == 1  # three concurrent callers, one batch of requests
    for prompt, (_, answer), score in zip(prompts, QA, scores):
        out = judge.last_outputs[reward_key(judge.identity, prompt, answer)]
        assert out.via == "logprobs" and 0 < out.mass <= 1.0 + 1e-6
        assert isinstance(out.raw, str) and out.value == score.value
    assert judge.identity.startswith("judge:" + embedded_servers["smollm2"].identity + ":tpl=")


@pytest.mark.integration
@pytest.mark.parametrize("case", ["wrong_key", "dead_endpoint"])
def test_judge_errors_are_error_scores(embedded_servers, case):
    from toa.reward import RewardService
    from toa.servers.vllm import free_port

    live = embedded_servers["smollm2"]
    endpoint = (_fake_endpoint(live.base_url, key="not-the-key") if case == "wrong_key"
                else _fake_endpoint(f"http://127.0.0.1:{free_port()}/v1"))
    judge = JudgeReward(endpoint, max_retries=0, timeout_s=10)
    service = RewardService(judge, retries=0)
    scores = asyncio.run(service.score(Prompt("p", QA[0][0]), [QA[0][1], QA[1][1]]))
    assert all(s.status == ERROR and s.value is None for s in scores), scores
    expected = "AuthenticationError" if case == "wrong_key" else "APIConnectionError"
    assert all(s.error.startswith(expected) for s in scores), scores
    assert not judge.last_outputs
