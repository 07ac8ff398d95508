"""The parameters a user gives the `toa` flow, shared with `toa-evolve` so the two cannot drift:
both flows declare exactly these (checked when flows/evolve.py is imported, and by a test)."""

from __future__ import annotations

import inspect
from typing import Any

from pydantic import BaseModel, Field


class RunParameters(BaseModel):
    """Each parameter overrides the run file (`config_file`), which overrides TOA_* environment
    variables and the defaults (toa.config)."""

    config_file: str | None = Field(None, description="Run file (TOML or YAML).")
    methods: list[str] | None = Field(None, description="Sampling methods, by registry name.")
    n: int | None = Field(None, description="Samples per agent.")
    seed: int | None = Field(None, description="Run seed.")
    prompts_path: str | None = Field(None, description="Prompt source (path or fsspec URL).")
    limit: int | None = Field(None, description="Use only the first `limit` prompts.")
    results_root: str | None = Field(None, description="Where results go (path or fsspec URL).")
    overrides: dict[str, Any] | None = Field(None, description='Dotted keys, e.g. {"reward.kind": "math"}.')

    def overrides_for_config(self) -> dict[str, Any]:
        """Dotted config keys for toa.config.load_config; parameters not given are left out."""
        given = {"methods": self.methods, "n": self.n, "seed": self.seed, "prompts.path": self.prompts_path,
                 "prompts.limit": self.limit, "results_root": self.results_root}
        return {**{k: v for k, v in given.items() if v is not None}, **(self.overrides or {})}


def check_declares(fn, extra: tuple[str, ...] = ()) -> None:
    """Raise if a flow function's parameters are not RunParameters' fields (plus `extra`), in
    order and with the same defaults."""
    declared = [(p.name, p.default) for p in inspect.signature(fn).parameters.values()]
    expected = [(name, None) for name in extra] + [(name, f.default) for name, f in RunParameters.model_fields.items()]
    if declared != expected:
        raise TypeError(f"flow {fn.__name__} parameters {declared} differ from RunParameters {expected}")
