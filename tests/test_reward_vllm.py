"""The vLLM-served reward path against a real vLLM CPU server (pooling runner) serving a tiny,
randomly initialised LlamaForSequenceClassification built and saved here (no download; the
tokenizer and chat template are SmolLM2's, from the embedded model folder).

Values are checked against the same model run by transformers in-process: equal logits prove
the raw-score option (no sigmoid), the chat template and the input order all at once."""

from __future__ import annotations

import asyncio
import math
import shutil

import pytest

from toa.rows import ERROR, OK, Prompt

pytestmark = pytest.mark.integration

ITEMS = [(Prompt(f"p{i}", f"What is {i} + {i}?"), f"The answer is {2 * i}. " * (i + 1))
         for i in range(6)]


def build_tiny_classifier(folder):
    """A 2-layer, hidden-64 Llama reward head (num_labels=1) with SmolLM2's tokenizer files."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    from toa.servers import ensure_embedded_model

    src = ensure_embedded_model("smollm2-135m-instruct")
    tok = AutoTokenizer.from_pretrained(src)
    torch.manual_seed(0)
    # head_dim 32: the vLLM CPU attention backend supports 32, 64, 80, ... (not 16)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                      max_position_embeddings=2048, num_labels=1, pad_token_id=tok.eos_token_id,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    LlamaForSequenceClassification(cfg).eval().save_pretrained(folder)
    tok.save_pretrained(folder)
    if (src / "chat_template.jinja").is_file():
        shutil.copy(src / "chat_template.jinja", folder / "chat_template.jinja")
    return folder


def reference_logits(folder, items):
    """What transformers computes for the same chat-formatted inputs (raw logits)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    out = []
    for prompt, response in items:
        ids = tok.apply_chat_template([{"role": "user", "content": prompt.text},
                                       {"role": "assistant", "content": response}],
                                      tokenize=True, return_tensors="pt")
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        with torch.no_grad():
            out.append(model(input_ids=ids).logits[0, 0].item())
    return out


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(backend that launched its own server, model folder); the server stops at module end."""
    from toa.reward.vllm_pool import VllmReward
    from toa.servers import LaunchSpec

    folder = build_tiny_classifier(tmp_path_factory.mktemp("tiny-rm"))
    spec = LaunchSpec(model=str(folder), dtype="float32", max_model_len=256)
    backend = VllmReward(launch=spec, alias="tiny-rm", log_dir=tmp_path_factory.mktemp("logs"))
    backend.start()  # a server that fails to start fails the tests (its message has the log tail)
    yield backend, folder
    backend.close()


def run(coro):
    return asyncio.run(coro)


def test_launch_uses_pooling_runner_and_identity(served):
    backend, _ = served
    assert backend.launch.extra_args[:2] == ["--runner", "pooling"]
    assert backend.identity == f"vllm:{backend.endpoint.identity}"
    assert backend.identity.startswith("vllm:tiny-rm@sha256:")


def test_raw_scores_match_transformers_in_order(served):
    backend, folder = served
    scores = run(backend.score_batch(ITEMS))
    assert [s.status for s in scores] == [OK] * len(ITEMS)
    values = [s.value for s in scores]
    assert all(math.isfinite(v) for v in values)
    ref = reference_logits(folder, ITEMS)
    # raw logits (a sigmoid would put every value in (0, 1) and miss the reference)
    assert values == pytest.approx(ref, abs=2e-3)
    assert len(set(round(v, 5) for v in values)) > 1  # distinct inputs, distinct scores


def test_batched_equals_one_by_one(served):
    backend, _ = served
    batched = run(backend.score_batch(ITEMS))

    async def singly():
        return [(await backend.score_batch([it]))[0] for it in ITEMS]

    one = run(singly())
    assert [s.value for s in one] == pytest.approx([s.value for s in batched], abs=1e-4)


def test_chat_style_requests_match_client_side_template(served):
    """Attached without a local tokenizer: one chat-style /classify per item, same values."""
    from toa.reward.vllm_pool import VllmReward

    backend, _ = served
    attached = VllmReward(backend.endpoint)
    assert attached.identity == backend.identity
    chat = run(attached.score_batch(ITEMS[:3]))
    local = run(backend.score_batch(ITEMS[:3]))
    assert [s.value for s in chat] == pytest.approx([s.value for s in local], abs=1e-4)


def test_service_batches_caches_and_isolates_too_long_items(served):
    from toa.reward import RewardService

    backend, _ = served
    service = RewardService(backend, max_batch=64, retries=0)
    too_long = (Prompt("long", "word " * 400), "ok")

    async def go():
        first = await asyncio.gather(*(service.score(p, [r]) for p, r in [*ITEMS, too_long]))
        again = await service.score(ITEMS[0][0], [ITEMS[0][1]])
        return [s[0] for s in first], again[0]

    scores, again = run(go())
    assert service.backend_calls == 1  # seven concurrent callers, one /classify request
    assert all(s.ok for s in scores[:-1])
    assert scores[-1].status == ERROR and "max_model_len" in scores[-1].error
    assert again.value == scores[0].value and service.cache_hits == 1


def test_stopped_server_gives_error_scores(served):
    """Runs last: the server is stopped, and scoring becomes error Scores, never numbers."""
    from toa.reward import RewardService
    from toa.reward.vllm_pool import VllmReward

    backend, _ = served
    endpoint = backend.endpoint
    attached = VllmReward(endpoint, tokenizer=str(served[1]))
    backend.close()
    assert backend.log_path is None

    async def go(b):
        service = RewardService(b, retries=1, backoff_s=0.01)
        return await service.score(ITEMS[0][0], [ITEMS[0][1], ITEMS[1][1]])

    for b in (backend, attached):  # closed launcher, and a client of the dead server
        scores = run(go(b))
        assert all(s.status == ERROR and s.value is None and s.error for s in scores)
    assert "closed" in run(go(backend))[0].error
    assert "Connect" in run(go(attached))[0].error
