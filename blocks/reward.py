"""`RewardModel`: a reward model saved as a Prefect block, so a run file names
`reward.block = "my-rm"` instead of carrying a judge's URL and key. The block holds the fields
that say WHICH reward model scores (kind, model, server, key); `toa.blocks.resolve` turns it
into the run's `RewardConfig`, so the run fingerprint is that of the resolved reward, never of
the block's name. The key is a SecretStr: stored encrypted, shown obfuscated."""

from __future__ import annotations

from typing import Any, Literal

from prefect.blocks.core import Block
from pydantic import Field, SecretStr


class RewardModel(Block):
    _block_type_name = "toa Reward Model"
    _description = "A reward model toa scores responses with (a RewardConfig, key as a secret)."

    kind: Literal["similarity", "math", "transformers", "custom", "vllm", "judge"] = Field(
        description="Reward backend, as toa's reward.kind.")
    model: str | None = Field(None, description="reward.model: embedding model or reward-model folder.")
    base_url: str | None = Field(None, description="kind 'vllm'/'judge': the OpenAI-compatible server's base URL.")
    served_model: str | None = Field(None, description="kind 'vllm'/'judge': model name to send in requests.")
    api_key: SecretStr | None = Field(None, description="kind 'vllm'/'judge': the server's API key; stored encrypted.")
    function: str | None = Field(None, description="kind 'custom': 'package.module:function' or a toa.rewards entry point.")
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="Further reward fields as in a run file (e.g. dtype, max_length, tokenizer, label_index, judge_template).")

    def reward_fields(self) -> dict[str, Any]:
        """The block as `reward.*` fields (only what it sets)."""
        out: dict[str, Any] = {"kind": self.kind, **self.options}
        for name in ("model", "function"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        if self.base_url is not None:
            out["endpoint"] = {"base_url": self.base_url, "model": self.served_model, "api_key": self.api_key}
        return out
