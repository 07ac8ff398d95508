"""TransformersReward on tiny randomly initialised reward models built and saved in the test:
the real Auto-class loading code, no download. A LlamaForSequenceClassification (num_labels=1,
Skywork style) and an ArmoRM-style custom-code model (auto_map + trust_remote_code, `.score`)."""

from __future__ import annotations

import asyncio
import json
import math
import shutil
from pathlib import Path

import pytest
import torch  # a required dependency: missing, the tests fail (never skip)

from toa.reward import RewardConfig, RewardService, build_backend, reward_key
from toa.reward.transformers_rm import TransformersReward, resolve_device
from toa.rows import OK, Prompt, RewardRecord

SMOLLM2 = Path.home() / ".cache" / "toa" / "models" / "smollm2-135m-instruct"
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> "
            "{% endfor %}")
MAX_POS = 128  # small position limit: the default max_length, so truncation is easy to reach

ARMO_CODE = '''
from dataclasses import dataclass
import torch
from transformers import LlamaConfig, LlamaModel, LlamaPreTrainedModel
from transformers.utils import ModelOutput


class TinyArmoConfig(LlamaConfig):
    model_type = "tiny_armo"


@dataclass
class ArmoOutput(ModelOutput):
    score: torch.FloatTensor = None
    rewards: torch.FloatTensor = None


class TinyArmoRM(LlamaPreTrainedModel):
    config_class = TinyArmoConfig

    def __init__(self, config):
        super().__init__(config)
        self.model = LlamaModel(config)
        self.regression_layer = torch.nn.Linear(config.hidden_size, 3, bias=False)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        last = attention_mask.sum(-1) - 1  # right padding: the last real token
        rewards = self.regression_layer(hidden[torch.arange(hidden.shape[0]), last])
        return ArmoOutput(score=rewards.mean(-1), rewards=rewards)
'''


def save_tokenizer(folder: Path):
    """The SmolLM2 tokenizer when the converted embedded model is cached, else a tiny
    WordLevel one; either way with a chat template. Returns the loaded tokenizer."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if (SMOLLM2 / "tokenizer.json").exists():
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            if (SMOLLM2 / name).exists():
                shutil.copy(SMOLLM2 / name, folder / name)
        return AutoTokenizer.from_pretrained(str(folder))
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<pad>", "<unk>", "<|user|>", "<|assistant|>", "<|end|>"] + [
        w for w in "the a of to and is in it that what capital france paris water boils at "
                   "degrees 100 celsius lorem ipsum dolor sit amet".split()]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                   eos_token="<|end|>")
    fast.chat_template = TEMPLATE
    fast.save_pretrained(str(folder))
    return fast


def llama_config(tok, **extra):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=MAX_POS, num_labels=1,
                       pad_token_id=tok.pad_token_id, **extra)


@pytest.fixture(scope="module")
def tiny_rm(tmp_path_factory) -> Path:
    from transformers import LlamaForSequenceClassification

    folder = tmp_path_factory.mktemp("tiny-skywork")
    tok = save_tokenizer(folder)
    torch.manual_seed(0)
    LlamaForSequenceClassification(llama_config(tok)).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def tiny_armo(tmp_path_factory) -> Path:
    """Saved the way ArmoRM ships: weights + modeling file + auto_map in config.json."""
    import importlib.util

    folder = tmp_path_factory.mktemp("tiny-armo")
    tok = save_tokenizer(folder)
    (folder / "modeling_tiny_armo.py").write_text(ARMO_CODE)
    spec = importlib.util.spec_from_file_location("tiny_armo_build", folder / "modeling_tiny_armo.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    torch.manual_seed(0)
    cfg = mod.TinyArmoConfig(**llama_config(tok).to_dict())
    mod.TinyArmoRM(cfg).save_pretrained(str(folder))
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "modeling_tiny_armo.TinyArmoConfig",
                          "AutoModelForSequenceClassification": "modeling_tiny_armo.TinyArmoRM"}
    config["architectures"] = ["TinyArmoRM"]
    (folder / "config.json").write_text(json.dumps(config))
    return folder


PAIRS = [
    (Prompt("a", "What is the capital of France?"), "Paris is the capital of France."),
    (Prompt("a", "What is the capital of France?"), "It is Lyon."),
    (Prompt("b", "At what temperature does water boil?"), "100 degrees Celsius at sea level."),
    (Prompt("b", "At what temperature does water boil?"), ""),
    (Prompt("c", "Say something."), "lorem ipsum dolor sit amet " * 5),
    (Prompt("d", "Hi"), "Hello there, how can I help you today? I can answer questions."),
]
LONG = (Prompt("long", "Write a lot."), "lorem ipsum dolor sit amet " * 200)


def values(scores):
    assert all(s.status == OK and isinstance(s.value, float) and math.isfinite(s.value)
               for s in scores), scores
    return [s.value for s in scores]


def test_scores_are_finite_and_deterministic_across_loads(tiny_rm):
    first = values(TransformersReward(str(tiny_rm)).score_sync(PAIRS))
    second = values(TransformersReward(str(tiny_rm)).score_sync(PAIRS))
    assert first == second
    assert len(set(first)) > 1  # a random model still tells inputs apart


def test_batched_equals_one_at_a_time(tiny_rm):
    batched = values(TransformersReward(str(tiny_rm), batch_size=4).score_sync(PAIRS))
    single = TransformersReward(str(tiny_rm), batch_size=1)
    one_by_one = [values(single.score_sync([p]))[0] for p in PAIRS]
    assert batched == pytest.approx(one_by_one, abs=1e-5)


def test_chat_template_is_applied(tiny_rm):
    rm = TransformersReward(str(tiny_rm))
    ids = rm.encode("What is the capital of France?", "Paris.")
    text = rm.tokenizer.decode(ids)
    assert "capital" in text
    bare = rm.tokenizer("What is the capital of France? Paris.", add_special_tokens=False)
    assert len(ids) > len(bare["input_ids"])  # role markup around the two turns


def test_overlong_input_is_truncated_and_marked(tiny_rm):
    rm = TransformersReward(str(tiny_rm))
    assert rm.max_length == MAX_POS  # the model's position limit (tokenizer says 1e30)
    short, long = rm.score_sync([PAIRS[0], LONG])
    assert short.ok and short.error is None
    assert long.ok and math.isfinite(long.value)
    assert long.error.startswith(f"truncated to {MAX_POS} tokens (had ")
    had, kept = rm.truncated[reward_key(rm.identity, *LONG)]
    assert kept == MAX_POS < had and rm.truncated_count == 1


def test_identity(tiny_rm):
    a, b = TransformersReward(str(tiny_rm)), TransformersReward(str(tiny_rm), batch_size=2)
    assert a.identity == b.identity  # batch size and device are operational
    assert a.identity.startswith(f"transformers:{tiny_rm.name}:") and ":tpl" in a.identity
    assert TransformersReward(str(tiny_rm), dtype="bfloat16").identity != a.identity
    assert TransformersReward(str(tiny_rm), max_length=64).identity != a.identity


async def test_service_batches_and_caches(tiny_rm):
    rm = TransformersReward(str(tiny_rm))
    calls = 0
    inner = rm.score_batch

    async def counted(items):
        nonlocal calls
        calls += 1
        return await inner(items)

    rm.score_batch = counted
    records: list[RewardRecord] = []
    svc = RewardService(rm, sink=records.append, backoff_s=0.001)
    by_prompt: dict[str, list[str]] = {}
    for p, r in PAIRS:
        by_prompt.setdefault(p.prompt_id, []).append(r)
    prompts = {p.prompt_id: p for p, _ in PAIRS}
    first = await asyncio.gather(*(svc.score(prompts[k], v) for k, v in by_prompt.items()))
    assert calls == 1 and len(records) == len(PAIRS)
    assert all(r.reward_id == rm.identity and r.status == OK for r in records)
    again = await asyncio.gather(*(svc.score(prompts[k], v) for k, v in by_prompt.items()))
    assert calls == 1 and again == first  # the repeat is served from the cache


def test_armorm_style_custom_code_uses_score(tiny_armo):
    with pytest.raises(ValueError):  # custom code is refused unless trusted
        TransformersReward(str(tiny_armo)).score_sync(PAIRS[:1])
    rm = TransformersReward(str(tiny_armo), trust_remote_code=True)
    got = values(rm.score_sync(PAIRS))
    assert type(rm.load()).__name__ == "TinyArmoRM"
    again = values(TransformersReward(str(tiny_armo), trust_remote_code=True, batch_size=1)
                   .score_sync(PAIRS))
    assert got == pytest.approx(again, abs=1e-5)


def test_config_builds_the_backend(tiny_rm):
    cfg = RewardConfig(kind="transformers", model=str(tiny_rm), dtype="float32", max_length=96)
    rm = build_backend(cfg)
    assert isinstance(rm, TransformersReward) and rm.max_length == 96
    assert cfg.fingerprint() == {"kind": "transformers", "model": str(tiny_rm),
                                 "dtype": "float32", "max_length": 96}


def test_device_and_gpu_pinning():
    assert resolve_device("cpu") == "cpu" and resolve_device("cuda:1") == "cuda:1"
    assert resolve_device("cpu", gpus=[2, 3]) == "cuda:2"
    with pytest.raises(ValueError):
        resolve_device("tpu")


def test_missing_folder_or_template(tmp_path, tiny_rm):
    with pytest.raises(FileNotFoundError):
        TransformersReward(str(tmp_path / "nope"))
    bare = tmp_path / "bare"
    shutil.copytree(tiny_rm, bare)
    for name in ("chat_template.jinja",):
        (bare / name).unlink(missing_ok=True)
    cfg = json.loads((bare / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="no chat template"):
        TransformersReward(str(bare))
