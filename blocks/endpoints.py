"""`ModelEndpoint`: an OpenAI-compatible endpoint saved as a Prefect block, so a run file can
name `block = "my-endpoint"` instead of carrying a URL and a key. The key is a SecretStr: the
Prefect API stores it encrypted and the UI shows it obfuscated."""

from __future__ import annotations

from prefect.blocks.core import Block
from pydantic import Field, SecretStr

from toa.servers import AttachSpec


class ModelEndpoint(Block):
    _block_type_name = "toa Model Endpoint"
    _description = "An OpenAI-compatible chat endpoint that toa samples from."

    base_url: str = Field(description="Base URL of the OpenAI-compatible API, e.g. http://gpu-1:8000/v1.")
    model: str = Field(description="Model name to send in requests (the server's served name).")
    api_key: SecretStr | None = Field(None, description="API key; stored encrypted by Prefect.")
    supports_n: bool = Field(True, description="Whether the server honours n>1 in one request.")

    def attach_spec(self) -> AttachSpec:
        return AttachSpec(base_url=self.base_url, model=self.model, api_key=self.api_key, supports_n=self.supports_n)
