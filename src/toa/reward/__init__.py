"""Rewards: one service (cache, micro-batching, dedupe, retries, records) in front of a backend.

Backends: `SimilarityReward` (default; cosine to the reference answer with the embedded
all-MiniLM-L6-v2) and `MathReward` (verifiable numeric answers); `VllmReward` (a reward model
behind vLLM's /classify, raw scores) and `JudgeReward` (an OpenAI-compatible chat model rating
1-9 on the packaged rubric); `TransformersReward` (an in-process sequence-classification reward
model, ArmoRM-style custom code included) and `CustomReward` (a user's callable). Importing this package
loads no backend: each one's module loads when its name is first used.
"""

from importlib import import_module

# name -> module: a backend's module (and its heavy imports: torch, transformers, httpx) loads
# only when the name is first used.
_HOMES = {
    "RewardConfig": "config", "build_backend": "config", "build_service": "config",
    "CustomReward": "custom", "JudgeReward": "judge", "MathReward": "math_verify",
    "RewardBackend": "service", "RewardService": "service", "cache_from_records": "service",
    "response_sha": "service", "reward_key": "service", "SimilarityReward": "similarity",
    "TransformersReward": "transformers_rm", "VllmReward": "vllm_pool",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'toa.reward' has no attribute {name!r}")
    return getattr(import_module(f"toa.reward.{_HOMES[name]}"), name)
