"""`ResultsLocation`: where a run's Parquet shards and reports go, saved as a Prefect block, so a
run names `results_block = "team-bucket"` instead of a URL and credentials. Plain fsspec
options (region, endpoint_url) are visible; credentials (key, secret, token) are a SecretDict:
stored encrypted, shown obfuscated, and kept as SecretStr in the run config, so they never
reach logs or the `runs` table (Store unwraps them only to open the filesystem)."""

from __future__ import annotations

from typing import Any

from prefect.blocks.core import Block
from prefect.types import SecretDict
from pydantic import Field, SecretStr


class ResultsLocation(Block):
    _block_type_name = "toa Results Location"
    _description = "Results root of toa runs: an fsspec URL, its storage options and credentials."

    url: str = Field(description="fsspec URL of the results root, e.g. s3://bucket/toa or /data/toa.")
    storage_options: dict[str, Any] = Field(default_factory=dict, description="Non-secret fsspec options.")
    credentials: SecretDict | None = Field(
        None, description="Secret fsspec options (e.g. {key, secret} for s3); stored encrypted.")

    def options(self) -> dict[str, Any]:
        """storage_options with the credentials merged in as SecretStr values."""
        secret = self.credentials.get_secret_value() if self.credentials is not None else {}
        return {**self.storage_options, **{k: SecretStr(str(v)) for k, v in secret.items()}}
