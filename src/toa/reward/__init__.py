"""Rewards: one service (cache, micro-batching, dedupe, retries, records) in front of a backend.

Backends: `SimilarityReward` (default; cosine to the reference answer with the embedded
all-MiniLM-L6-v2) and `MathReward` (verifiable numeric answers); `VllmReward` (a reward model
behind vLLM's /classify, raw scores) and `JudgeReward` (an OpenAI-compatible chat model rating
1-9 on the packaged rubric); `TransformersReward` (an in-process sequence-classification reward
model, ArmoRM-style custom code included) and `CustomReward` (a user's callable). Importing this package is
cheap: sentence-transformers loads only when a similarity model is first used.
"""

from toa.reward.config import RewardConfig, build_backend, build_service
from toa.reward.custom import CustomReward
from toa.reward.judge import JudgeReward
from toa.reward.math_verify import MathReward
from toa.reward.service import (
    RewardBackend,
    RewardService,
    cache_from_records,
    response_sha,
    reward_key,
)
from toa.reward.similarity import SimilarityReward
from toa.reward.transformers_rm import TransformersReward
from toa.reward.vllm_pool import VllmReward

__all__ = [
    "RewardBackend", "RewardService", "reward_key", "response_sha", "cache_from_records",
    "SimilarityReward", "MathReward", "VllmReward", "JudgeReward", "RewardConfig", "build_backend", "build_service",
    "TransformersReward", "CustomReward",
]
