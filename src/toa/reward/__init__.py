"""Rewards: one service (cache, micro-batching, dedupe, retries, records) in front of a backend.

Backends: `SimilarityReward` (default; cosine to the reference answer with the embedded
all-MiniLM-L6-v2) and `MathReward` (verifiable numeric answers). Importing this package is
cheap: sentence-transformers loads only when a similarity model is first used.
"""

from toa.reward.config import RewardConfig, build_backend, build_service
from toa.reward.math_verify import MathReward
from toa.reward.service import (
    RewardBackend,
    RewardService,
    cache_from_records,
    response_sha,
    reward_key,
)
from toa.reward.similarity import SimilarityReward

__all__ = [
    "RewardBackend", "RewardService", "reward_key", "response_sha", "cache_from_records",
    "SimilarityReward", "MathReward", "RewardConfig", "build_backend", "build_service",
]
