"""Prefect blocks of toa: saved, reusable model endpoints, reward models and results locations
(keys and credentials as secrets). Register them with `prefect block register -m toa.blocks`;
a run names them (`agents[].block`, `reward.block`, `results_block`) instead of inline values."""

from toa.blocks.endpoints import ModelEndpoint
from toa.blocks.results import ResultsLocation
from toa.blocks.reward import RewardModel

__all__ = ["ModelEndpoint", "ResultsLocation", "RewardModel"]
