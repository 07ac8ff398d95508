"""Resolve the blocks a run names into plain config values, before the run fingerprint is taken.

- `reward.block`: a `RewardModel` block supplies the reward fields; fields given beside it in
  the run config win (e.g. `reward.device`). The resolved config has no block name left, so
  the run fingerprint and the reward cache key are those of the reward model itself.
- `results_block`: a `ResultsLocation` block supplies `results_root` and storage options
  (credentials as SecretStr); storage options given in the run config are laid on top.
Agents' `block` stays a name: the attach task loads it, so the key lives only in that task.
A block that cannot be loaded, or that makes the config invalid, is a ConfigError naming it.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from toa.config import ConfigError, RunConfig
from toa.reward.config import RewardConfig
from toa.run_file import ResultsFields


def resolve_blocks(cfg: RunConfig) -> RunConfig:
    update: dict[str, Any] = {}
    if cfg.reward.block:
        update["reward"] = _reward_from_block(cfg.reward)
    if cfg.results_block:
        update.update(_results_from_block(cfg))
    return cfg.model_copy(update=update) if update else cfg


def resolve_results(fields: ResultsFields) -> ResultsFields:
    """The results fields alone (toa.run_file.results_location) with their block resolved."""
    return fields.model_copy(update=_results_from_block(fields)) if fields.results_block else fields


def _results_from_block(fields: ResultsFields) -> dict[str, Any]:
    location = _load("results_block", "ResultsLocation", fields.results_block)
    return {"results_root": location.url, "storage_options": {**location.options(), **fields.storage_options}}


def _reward_from_block(reward: RewardConfig) -> RewardConfig:
    block = _load("reward.block", "RewardModel", reward.block)
    given = reward.model_dump(exclude_unset=True, exclude={"block"})
    try:
        return RewardConfig.model_validate({**block.reward_fields(), **given})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"reward.block {reward.block!r} gives an invalid reward config: {problems}") from None


def _load(field: str, kind: str, name: str):
    from toa import blocks

    try:
        return getattr(blocks, kind).load(name)
    except Exception as exc:  # noqa: BLE001 -- not found, no API, wrong type: all one message
        raise ConfigError(f"{field} {name!r}: cannot load toa {kind} block: "
                          f"{type(exc).__name__}: {str(exc)[:200]}") from None
