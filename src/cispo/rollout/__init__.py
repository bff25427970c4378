"""Rollout: prompts → samples → rewards → advantages → datums, through a `SamplingClient`."""

from cispo.rollout.rollouts import Rollout, collect_rollout, sample_rows, step_seed

__all__ = ["Rollout", "collect_rollout", "sample_rows", "step_seed"]
