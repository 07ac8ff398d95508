"""Prefect blocks of toa: saved, reusable model endpoints (API keys as secrets).
Register them with `prefect block register -m toa.blocks`."""

from toa.blocks.endpoints import ModelEndpoint

__all__ = ["ModelEndpoint"]
