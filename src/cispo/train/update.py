"""The update: `rl.epochs × rl.minibatches` optimizer steps on one rollout batch, through a
training client (the second stage of an RL step; `cispo.rollout` is the first)."""

from __future__ import annotations

import time
from typing import Any

from cispo import distributed
from cispo.client import AdamParams, TrainingClient
from cispo.config import TrainConfig
from cispo.rollout.rollouts import Rollout, minibatch_size, output_logprobs, with_old_logprobs


def train_on_rollout(
    training: TrainingClient, rollout: Rollout, config: TrainConfig, *, lag: int = 0
) -> dict[str, float]:
    """`rl.epochs × rl.minibatches` optimizer steps on one rollout batch; returns metrics.

    `lag`: trainer version − the version that sampled the batch (0: on-policy). A stale batch gets
    old logprobs recomputed at the current weights when `recomputes_old_logprobs` says so; the
    loss is `loss_fn_config(config)`, the configured loss plus any train-vs-sampler correction.

    Under torchrun every rank holds the whole batch and passes its contiguous share of each
    minibatch (`cispo.distributed.rank_share`); the engine sums the normalisers over the ranks,
    so the update is that of one process, and its metrics are merged (the same on every rank).
    """
    rl, datums = config.rl, list(rollout.datums)
    t0 = time.perf_counter()
    metrics: dict[str, float] = {}
    if datums and recomputes_old_logprobs(config, lag):
        old = training.forward(
            distributed.rank_share(datums), "cross_entropy", temperature=config.sampling.temperature
        )
        mine = output_logprobs(old.result().loss_fn_outputs)
        everyone = [lp for share in distributed.gather_objects(mine) for lp in share]
        datums = with_old_logprobs(datums, everyone)
    if datums:
        adam = adam_params(config, rollout.step)
        loss_config = loss_fn_config(config)
        per = minibatch_size(len(datums), config)
        for epoch in range(rl.epochs):
            for start in range(0, len(datums), per):
                fwd = training.forward_backward(
                    distributed.rank_share(datums[start : start + per]),
                    config.loss.name,
                    loss_config,
                    temperature=config.sampling.temperature,
                )
                opt = training.optim_step(adam)
                if epoch == 0 and start == 0:
                    out = fwd.result().metrics
                    metrics |= {k.replace(":sum", ""): v for k, v in out.items()}
                metrics |= opt.result().metrics or {}
    metrics["time/train"] = time.perf_counter() - t0
    return metrics


def loss_fn_config(config: TrainConfig) -> dict[str, Any]:
    """The loss config of every update: `config.loss`'s plus the train-vs-sampler correction
    `asynchronous.correction` (TIS/MIS on exp(old − sampler); exactly 1 where old = sampler)."""
    out = config.loss.loss_fn_config()
    run = config.asynchronous
    if run.correction != "none":
        out |= {"correction": run.correction, "correction_ratio_max": run.correction_ratio_max}
    return out


def recomputes_old_logprobs(config: TrainConfig, lag: int) -> bool:
    """Whether a batch trained `lag` versions after it was sampled gets fresh `old_logprobs`:
    always with `rl.recompute_old_logprobs`; for a stale batch with
    `asynchronous.recompute_old_logprobs` and the old anchor."""
    run = config.asynchronous
    return config.rl.recompute_old_logprobs or (
        lag > 0 and run.recompute_old_logprobs and config.loss.anchor == "old"
    )


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
