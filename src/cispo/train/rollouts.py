"""One rollout batch and the optimizer steps on it: the two stages of an RL step.

`collect_rollout` samples `rl.group_size` completions for `rl.prompts_per_step` prompts from a
sampling client, scores them, computes advantages and builds datums; `train_on_rollout` runs
`rl.epochs × rl.minibatches` optimizer steps on them through a training client. The synchronous
loop (`cispo.train.loop`) and the async one (`cispo.train.async_loop`) both use them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from cispo.advantages import compute_advantages
from cispo.client import AdamParams, ModelInput, SamplingClient, SamplingParams
from cispo.client.service import TrainingClient
from cispo.datums import rl_datum
from cispo.prompts import decode_completion, encode_prompt
from cispo.rewards import score_all
from cispo.tasks import Problem, Task
from cispo.train.config import TrainConfig


def step_seed(base: int, step: int, salt: int) -> int:
    """A distinct, reproducible seed per (run seed, step, use): a resumed step redraws its data."""
    return (base * 1_000_003 + step * 7919 + salt) % (2**31 - 1)


@dataclass
class Rollout:
    """One rollout batch: sampled groups, rewards, advantages and the datums built from them."""

    step: int
    problems: list[Problem]
    texts: list[str]  # [P * G] decoded completions
    rewards: torch.Tensor  # [P, G]
    advantages: torch.Tensor  # [P, G]
    datums: list[Any]
    metrics: dict[str, float]
    version: int = 0  # policy version (optimizer steps) of the weights that sampled it


def collect_rollout(sampler: SamplingClient, task: Task, step: int, config: TrainConfig) -> Rollout:
    """Sample `rl.group_size` completions for `rl.prompts_per_step` prompts, score, build datums."""
    rl, tok = config.rl, sampler.get_tokenizer()
    t0 = time.perf_counter()
    problems = task.problems(
        "train", seed=step_seed(config.run.seed, step, 2), n=rl.prompts_per_step
    )
    params = SamplingParams(
        max_tokens=config.sampling.max_tokens,
        temperature=config.sampling.temperature,
        top_k=config.sampling.top_k,
        top_p=config.sampling.top_p,
        seed=step_seed(config.run.seed, step, 3),
    )
    prompts = [encode_prompt(tok, p.prompt) for p in problems]
    futures = [sampler.sample(ModelInput.from_ints(p), rl.group_size, params) for p in prompts]
    groups = [f.result().sequences for f in futures]
    t1 = time.perf_counter()
    texts = [decode_completion(tok, s.tokens) for g in groups for s in g]
    flat_problems = [p for p in problems for _ in range(rl.group_size)]
    scored = score_all(task, flat_problems, texts, timeout_s=config.task.reward_timeout_s)
    rewards = torch.tensor(scored.rewards, dtype=torch.float32).reshape(len(problems), -1)
    adv = compute_advantages(rewards, rl.advantage)
    datums = []
    for i, group in enumerate(groups):
        if bool((adv.advantages[i] == 0).all()):
            continue  # a group with no signal adds no gradient, only normaliser mass
        for j, seq in enumerate(group):
            if seq.tokens:
                datums.append(
                    rl_datum(
                        prompts[i],
                        seq.tokens,
                        seq.logprobs,
                        float(adv.advantages[i, j]),
                        old_logprobs=seq.logprobs,
                    )
                )
    correct = [r == 1.0 for r in scored.rewards]
    metrics = adv.metrics | {
        "time/sample": t1 - t0,
        "time/reward": time.perf_counter() - t1,
        "reward/mean": float(torch.nanmean(rewards)),
        "reward/accuracy": sum(correct) / len(correct),
        "reward/errors": float(scored.num_errors + scored.num_timeouts),
        "rl/datums": float(len(datums)),
        "rl/tokens": float(sum(len(s.tokens) for g in groups for s in g)),
    }
    return Rollout(
        step,
        problems,
        texts,
        rewards,
        adv.advantages,
        datums,
        metrics,
        version=getattr(sampler, "version", 0),
    )


FirstStep = Callable[[list[Any]], tuple[list[Any], dict[str, float]]]
"""Accumulates the gradient of a round's first minibatch some other way (the async loop's
gradient share): given the round's datums, returns them with any recomputed `old_logprobs` and
the metrics of that first forward/backward."""


def minibatch_size(num_datums: int, config: TrainConfig) -> int:
    """Datums per optimizer step when a batch of `num_datums` is split `rl.minibatches` ways."""
    return math.ceil(num_datums / config.rl.minibatches) if num_datums else 0


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


def sample_rows(rollout: Rollout, group_size: int, n: int = 4) -> list[dict[str, Any]]:
    """A few (prompt, completion, reward, advantage) rows for the samples table."""
    return [
        {
            "prompt": rollout.problems[i].prompt,
            "completion": rollout.texts[i * group_size],
            "reward": float(rollout.rewards[i, 0]),
            "advantage": float(rollout.advantages[i, 0]),
        }
        for i in range(min(n, len(rollout.problems)))
    ]


def with_old_logprobs(datums: Sequence[Any], old: Sequence[Sequence[float]]) -> list[Any]:
    """`datums` with `old_logprobs` replaced by per-position logprobs (one list per datum)."""
    out = []
    for datum, logprobs in zip(datums, old, strict=True):
        inputs = dict(datum.loss_fn_inputs)
        inputs["old_logprobs"] = list(logprobs)
        out.append(type(datum)(model_input=datum.model_input, loss_fn_inputs=inputs))
    return out


def output_logprobs(outputs: Sequence[Mapping[str, Any]]) -> list[list[float]]:
    """The per-position `logprobs` of each datum of a forward pass's `loss_fn_outputs`."""
    return [[float(x) for x in o["logprobs"].tolist()] for o in outputs]
