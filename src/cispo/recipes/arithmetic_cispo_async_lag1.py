"""The embedded default run, trained asynchronously with lag 1 in a high-off-policy setting.

Our version of NeMo-RL's nightly `grpo-cispo-mm1-async-lag1-highoffpolicy` recipe
(`max_trajectory_age_steps: 1`, repeated updates per rollout, a non-colocated generator, the
importance-sampling correction on, CISPO weights clipped to [1 - 1.0, 1 + 5.0] = [0, 6]) on the
arithmetic task: a sampler worker process generates batch k+1 with weights one trainer step old
while the trainer makes two optimizer steps on batch k, anchored on recomputed old logprobs
(`loss.anchor="old"`), with truncated IS exp(old − sampler) ≤ 2 on the stale tokens. One torch
thread for the trainer and one for the worker: the two cores of the reference machine.
"""

from dataclasses import replace

from cispo.config import AsyncConfig, TrainConfig


def recipe() -> TrainConfig:
    base = TrainConfig()
    return replace(
        base,
        loss=replace(base.loss, anchor="old", ratio_max=6.0),
        rl=replace(base.rl, minibatches=2),
        run=replace(base.run, dir="runs/arithmetic_cispo_async_lag1", threads=1),
        asynchronous=AsyncConfig(
            enabled=True,
            max_staleness=1,
            correction="tis",
            worker_threads=1,
        ),
    )
