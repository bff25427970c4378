"""Async off-policy training: the sampler worker process, weight sync + canary, staleness pacing
(docs/async.md)."""
