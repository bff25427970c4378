"""Rollout: sampling completions, with the sampler's per-token logprobs."""

from cispo.rollout.sampler import SampledSequence, SamplingParams, compute_logprobs, sample

__all__ = ["SampledSequence", "SamplingParams", "compute_logprobs", "sample"]
