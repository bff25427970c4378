"""Rollout: prompts → samples → rewards → advantages → datums, through a `SamplingClient`; the
`RolloutSource` protocol the RL loop draws batches from, and its in-process implementation."""

from cispo.rollout.rollouts import Rollout, collect_rollout, sample_rows, step_seed
from cispo.rollout.source import InProcessSource, RolloutSource

__all__ = [
    "InProcessSource",
    "Rollout",
    "RolloutSource",
    "collect_rollout",
    "sample_rows",
    "step_seed",
]
