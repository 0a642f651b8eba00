"""Synthetic abdominal CT cohorts in the native layouts of the public data sets."""

from .cohorts import ALL_COHORTS, COHORTS, generate
from .phantom import PRESETS

__all__ = ["ALL_COHORTS", "COHORTS", "PRESETS", "generate"]
