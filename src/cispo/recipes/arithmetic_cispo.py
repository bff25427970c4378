"""The embedded default: a 0.54M-parameter Llama-style model learns two-digit addition/subtraction.

A supervised warm start (800 steps at a constant learning rate 1e-3) gets the model to a few tens of
percent held-out greedy accuracy, then 600 CISPO steps (64 prompts × 8 samples, the one-sided weight
band [0, 4] of Tinker's default, learning rate 5e-4 decaying to 5%) raise it further. The warm
start is deliberately not annealed: an annealed one sits in a sharp minimum that RL cannot leave
without losing accuracy. docs/LOG.md records the calibration, the seeds and the negative results.
"""

from cispo.config import TrainConfig


def recipe() -> TrainConfig:
    return TrainConfig()
