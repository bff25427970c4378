"""The embedded default: a ~0.1M-parameter Llama-style model learns two-digit addition/subtraction.

A short supervised warm start brings held-out greedy accuracy to roughly a third, then CISPO with
the
one-sided [0, 4] weight band (Tinker's default) raises it. Sized to finish in under five minutes on
two
idle CPU cores; `docs/LOG.md` records the seeds and numbers it was calibrated on.
"""

from cispo.train.config import TrainConfig


def recipe() -> TrainConfig:
    return TrainConfig()
