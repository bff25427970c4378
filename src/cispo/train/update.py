"""The update: `rl.epochs × rl.minibatches` optimizer steps on one rollout batch, through a
training client (the second stage of an RL step; `cispo.rollout` is the first)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from cispo.client import AdamParams, TrainingClient
from cispo.config import TrainConfig
from cispo.rollout.rollouts import Rollout, minibatch_size, output_logprobs, with_old_logprobs

FirstStep = Callable[[list[Any]], tuple[list[Any], dict[str, float]]]
"""Accumulates the gradient of a round's first minibatch some other way (the async loop's
gradient share): given the round's datums, returns them with any recomputed `old_logprobs` and
the metrics of that first forward/backward."""


def train_on_rollout(
    training: TrainingClient,
    rollout: Rollout,
    config: TrainConfig,
    *,
    loss_fn_config: dict[str, Any] | None = None,
    first_step: FirstStep | None = None,
) -> dict[str, float]:
    """`rl.epochs × rl.minibatches` optimizer steps on one rollout batch; returns metrics.

    `loss_fn_config` replaces `config.loss.loss_fn_config()` (the async loop adds corrections).
    `first_step`, when given, is called once (even for an empty batch) instead of the old-logprob
    recompute and the first minibatch's forward/backward.
    """
    rl, datums = config.rl, list(rollout.datums)
    if loss_fn_config is None:
        loss_fn_config = config.loss.loss_fn_config()
    t0 = time.perf_counter()
    metrics: dict[str, float] = {}
    first: dict[str, float] | None = None
    if first_step is not None:
        datums, first = first_step(datums)
    elif datums and rl.recompute_old_logprobs:
        old = training.forward(datums, "cross_entropy", temperature=config.sampling.temperature)
        datums = with_old_logprobs(datums, output_logprobs(old.result().loss_fn_outputs))
    if datums:
        adam = adam_params(config, rollout.step)
        per = minibatch_size(len(datums), config)
        for epoch in range(rl.epochs):
            for start in range(0, len(datums), per):
                shared = first is not None and epoch == 0 and start == 0
                fwd = None  # the first step's gradient is already accumulated when `shared`
                if not shared:
                    fwd = training.forward_backward(
                        datums[start : start + per],
                        config.loss.name,
                        loss_fn_config,
                        temperature=config.sampling.temperature,
                    )
                opt = training.optim_step(adam)
                if epoch == 0 and start == 0:
                    out = first if fwd is None else fwd.result().metrics
                    metrics |= {k.replace(":sum", ""): v for k, v in (out or {}).items()}
                metrics |= opt.result().metrics or {}
    metrics["time/train"] = time.perf_counter() - t0
    return metrics


def adam_params(config: TrainConfig, step: int) -> AdamParams:
    """The optimizer settings of RL step `step` (the learning rate follows the schedule)."""
    optim = config.optim
    return AdamParams(
        learning_rate=optim.lr_at(step, config.rl.steps),
        beta1=optim.beta1,
        beta2=optim.beta2,
        eps=optim.eps,
        weight_decay=optim.weight_decay,
        grad_clip_norm=optim.grad_clip_norm,
    )
