"""Reading a run file, and reading from it alone where the results go.

`ResultsFields` declares the three run-config fields that name the results root; RunConfig
(toa.config) inherits them, so they are declared once. `results_location` reads just those
three with the run config's precedence (defaults < run file < TOA_* environment) and validates
nothing else: the commands that only read results (`toa sql`, `toa report`, `toa tree`,
`toa export`) need no more. Validating the whole run config imports every method, polars and the
server code: 0.5-0.8 s of a 0.8-1.0 s `toa sql "select 1"`, whose goal is 0.5 s (README, "Speed
and memory"). So this module imports nothing of toa beyond errors and storage.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, SettingsConfigDict

from toa.errors import UserError
from toa.storage import mask_credentials

OPERATIONAL = {"operational": True}  # json_schema_extra marker: excluded from the fingerprint


class ConfigError(UserError):
    """A bad configuration; the message names every bad field at once."""


def read_run_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        data = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except (OSError, tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read run file: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a run file must hold a table/mapping at the top level")
    return data


class ResultsFields(BaseSettings):
    """Where a run's results go. Alone (`results_location`) the other run-config fields are
    ignored; RunConfig forbids unknown ones."""

    model_config = SettingsConfigDict(env_prefix="TOA_", env_nested_delimiter="__", extra="ignore")

    results_root: str = Field("results", description="fsspec URL of the results root (Parquet shards + DuckDB).", json_schema_extra=OPERATIONAL)
    storage_options: dict[str, Any] = Field(default_factory=dict, description="fsspec options for results_root.", json_schema_extra=OPERATIONAL)
    results_block: str | None = Field(None, description="Name of a toa ResultsLocation Prefect block; it replaces results_root and supplies storage options (credentials as secrets).", json_schema_extra=OPERATIONAL)

    # credentials written in the run file print and serialize masked (runs.config_json, logs)
    _mask_storage_credentials = field_validator("storage_options")(mask_credentials)


def results_location(path: str | Path | None = None) -> ResultsFields:
    """The results fields of the run file at `path` (None: the defaults) under the environment,
    as toa.config.load_config would resolve them (a results_block is not resolved here)."""
    given = read_run_file(path) if path else {}
    merged = {name: given[name] for name in ResultsFields.model_fields if name in given}
    deep_merge(merged, EnvSettingsSource(ResultsFields)())
    try:
        return ResultsFields.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(explain(exc, path)) from None


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> None:
    """Lay `top` over `base` in place: mappings merge key by key, anything else (a list
    included) is replaced whole."""
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            deep_merge(base[key], value)
        else:
            base[key] = value


def explain(exc: ValidationError, path: str | Path | None) -> str:
    """A config's every validation problem, one line each: field, message, offending value."""
    where = f" in {path}" if path else ""
    lines = [f"invalid toa config{where}: {exc.error_count()} problem(s)"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        got = err.get("input")
        shown = "" if isinstance(got, (dict, list)) or not loc else f" (got {json.dumps(got, default=str)[:80]})"
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"  {loc}: {msg}{shown}" if loc else f"  {msg}")
    return "\n".join(lines)
