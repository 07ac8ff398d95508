"""Sequence-classification reward models run in-process with Hugging Face transformers.

Covers the two families TOA-style pipelines use:
- any `AutoModelForSequenceClassification` with one output (Skywork-Reward, most RMs): the
  reward is `logits[:, 0]`;
- ArmoRM-style custom code (`trust_remote_code=True`, an `auto_map` in config.json): when the
  model's output has a `.score` attribute, that is the reward (ArmoRM's gated preference score).

Input: the model's OWN chat template applied to [user: prompt.text, assistant: response], no
generation prompt; a tokenizer without a chat template is an error at construction (guessing a
format would silently produce meaningless rewards).

Batching by length: items are tokenized, sorted by token count, cut into chunks of
`batch_size` (default 8: a 7B RM at 4096 tokens fills a GPU quickly, and on CPU larger batches
only add padding) and padded on the right (ArmoRM-era pooling code assumes right padding);
scores go back in the original order. Sorting keeps padding, i.e. wasted compute, small.

Truncation: `max_length` defaults to the tokenizer's `model_max_length`, capped by the config's
`max_position_embeddings` and by 4096 (tokenizers often report 1e30; 4096 bounds CPU memory).
An input longer than that is cut to its first `max_length` tokens (the tokenizer's usual right
truncation) and scored, and it is MARKED: the backend's Score is
`Score(value, "ok", error="truncated to N tokens (had M)")`, an ok status with an informational
message. Note that `RewardService` normalises ok Scores to `error=None` before they reach a
method or a RewardRecord, so the durable mark is `self.truncated`: {reward_key: (M, N)}, keyed
by the same reward key as the RewardRecord (join on it), plus the `truncated_count` counter.

Options: `dtype` ("auto" = the checkpoint's own, "float32", "bfloat16", "float16") changes the
values, so it is part of the identity, as is `max_length` (it decides what is truncated).
`device` ("cpu", "cuda", "cuda:N") and `batch_size` are operational. GPU pinning: `gpus=[i, ...]`
places the model on "cuda:<first>"; CUDA_VISIBLE_DEVICES is process-wide (it would move every
other model in this process too, and is read only once at CUDA init), so it is not touched.

Identity = "transformers:<folder label>:<12 hex>:tpl<8 hex>:<dtype>:L<max_length>", where the
12 hex are the content hash of the folder's weights, tokenizer, templates, configs and custom
code (toa.identity.folder_digest: a same-size fine-tune is a new reward; hashed once per file
version, then cached) and tpl hashes the chat template text.

The tokenizer loads at construction (cheap; the identity needs its template); the model loads
lazily, once, under a lock; scoring runs in asyncio.to_thread so the event loop stays free.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
import time
from pathlib import Path
from typing import Any

from toa.identity import folder_digest
from toa.reward.service import reward_key
from toa.rows import OK, Prompt, Score

DTYPES = ("auto", "float32", "bfloat16", "float16")
DEFAULT_MAX_LENGTH_CAP = 4096


def _offline() -> None:
    """Never reach for the hub: the model is a local folder."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def resolve_device(device: str = "cpu", gpus: list[int] | None = None) -> str:
    """'cpu' | 'cuda' | 'cuda:N'; `gpus` pins to 'cuda:<first>' (see module docstring)."""
    if gpus:
        return f"cuda:{int(gpus[0])}"
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    return device


def weights_fingerprint(folder: Path) -> str:
    """The content hash of the model folder (toa.identity.folder_digest), 12 hex."""
    return folder_digest(folder)[:12]


def default_max_length(tokenizer: Any, config: dict) -> int:
    candidates = [DEFAULT_MAX_LENGTH_CAP, int(min(tokenizer.model_max_length or 1e9, 1e9))]
    if config.get("max_position_embeddings"):
        candidates.append(int(config["max_position_embeddings"]))
    return min(candidates)


class TransformersReward:
    """`RewardBackend` over a local sequence-classification reward model folder."""

    def __init__(self, model: str, dtype: str = "auto", device: str = "cpu",
                 batch_size: int = 8, max_length: int | None = None,
                 trust_remote_code: bool = False, gpus: list[int] | None = None) -> None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        self.model_dir = Path(model).expanduser().resolve()
        if not (self.model_dir / "config.json").is_file():
            raise FileNotFoundError(f"reward model folder with config.json not found: {model!r}")
        self.dtype, self.batch_size = dtype, max(1, batch_size)
        self.device = resolve_device(device, gpus)
        self.trust_remote_code = trust_remote_code
        self.tokenizer = self._load_tokenizer()
        self.max_length = max_length or default_max_length(self.tokenizer, self._config_json())
        self.identity = self._identity()
        self._model: Any = None
        self._lock = threading.Lock()
        self.load_s: float | None = None
        self.truncated: dict[str, tuple[int, int]] = {}  # reward_key -> (had, kept) tokens
        self.truncated_count = 0

    # ---- construction -------------------------------------------------------------------
    def _config_json(self) -> dict:
        import json

        return json.loads((self.model_dir / "config.json").read_text())

    def _load_tokenizer(self) -> Any:
        _offline()
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(self.model_dir),
                                            trust_remote_code=self.trust_remote_code)
        if not getattr(tok, "chat_template", None):
            raise ValueError(f"{self.model_dir} has no chat template: a reward model must be "
                             f"scored in the format it was trained on")
        if tok.pad_token is None:  # batching needs one; unk/eos never change the last real token
            tok.pad_token = tok.unk_token or tok.eos_token
        tok.padding_side = "right"
        return tok

    def _identity(self) -> str:
        label = self.model_dir.name
        tpl = hashlib.sha256(str(self.tokenizer.chat_template).encode()).hexdigest()[:8]
        return (f"transformers:{label}:{weights_fingerprint(self.model_dir)}:tpl{tpl}:"
                f"{self.dtype}:L{self.max_length}")

    def load(self) -> Any:
        """Load the model once (thread-safe); later calls return it."""
        with self._lock:
            if self._model is None:
                start = time.perf_counter()
                self._model = self._load_model()
                self.load_s = time.perf_counter() - start
            return self._model

    def _load_model(self) -> Any:
        _offline()
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(
            str(self.model_dir), dtype=self.dtype, trust_remote_code=self.trust_remote_code)
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = self.tokenizer.pad_token_id
        return model.to(self.device).eval()

    # ---- scoring ------------------------------------------------------------------------
    async def score_batch(self, items: list[tuple[Prompt, str]]) -> list[Score]:
        return await asyncio.to_thread(self.score_sync, items)

    def score_sync(self, items: list[tuple[Prompt, str]]) -> list[Score]:
        ids = [self.encode(p.text, r) for p, r in items]
        kept = [x[: self.max_length] for x in ids]
        values: list[float] = [0.0] * len(items)
        order = sorted(range(len(items)), key=lambda i: len(kept[i]))
        for start in range(0, len(order), self.batch_size):
            chunk = order[start: start + self.batch_size]
            for i, v in zip(chunk, self._forward([kept[i] for i in chunk])):
                values[i] = v
        return [self._score(items[i], values[i], len(ids[i])) for i in range(len(items))]

    def encode(self, prompt_text: str, response: str) -> list[int]:
        """Token ids of the chat-templated pair, untruncated."""
        messages = [{"role": "user", "content": prompt_text},
                    {"role": "assistant", "content": response}]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False)
        # the template already holds any BOS: adding special tokens again would double it
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _forward(self, batch: list[list[int]]) -> list[float]:
        import torch

        model = self.load()
        enc = self.tokenizer.pad({"input_ids": batch}, padding=True, return_tensors="pt")
        with torch.inference_mode():
            out = model(input_ids=enc["input_ids"].to(self.device),
                        attention_mask=enc["attention_mask"].to(self.device))
        return reward_values(out)

    def _score(self, item: tuple[Prompt, str], value: float, n_tokens: int) -> Score:
        if n_tokens <= self.max_length:
            return Score(value, OK, None)
        self.truncated[reward_key(self.identity, *item)] = (n_tokens, self.max_length)
        self.truncated_count += 1
        return Score(value, OK, f"truncated to {self.max_length} tokens (had {n_tokens})")


def reward_values(out: Any) -> list[float]:
    """ArmoRM-style `.score` when the output has one, else the single logit."""
    score = getattr(out, "score", None)
    if score is None:
        logits = out.logits if hasattr(out, "logits") else out[0]
        if logits.dim() != 2 or logits.shape[1] != 1:
            raise ValueError(f"reward model must have one output, got logits of shape "
                             f"{tuple(logits.shape)}; set num_labels=1")
        score = logits[:, 0]
    return [float(x) for x in score.float().reshape(-1).tolist()]


__all__ = ["TransformersReward", "resolve_device", "reward_values", "weights_fingerprint"]
