"""One rollout batch: prompts → samples → rewards → advantages → datums, through a sampling client.

`collect_rollout` samples `rl.group_size` completions for `rl.prompts_per_step` prompts from a
`SamplingClient`, scores them, computes advantages and builds datums: `sample_share` over the whole
batch, then `assemble_rollout`. Under torchrun each rank samples its share of the prompts and every
rank assembles the gathered shares (`cispo.rollout.source.InProcessSource`). The helpers below
reshape a batch's datums for the update (`minibatch_size`, `with_old_logprobs`); the update
itself is `cispo.train.update.train_on_rollout`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from cispo.advantages import compute_advantages
from cispo.client import ModelInput, SamplingClient, SamplingParams
from cispo.config import TrainConfig
from cispo.datums import rl_datum
from cispo.prompts import decode_completion, encode_prompt
from cispo.rewards import score_all
from cispo.tasks import Problem, Task
from cispo.types import SampledSequence


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


@dataclass
class SampledShare:
    """Prompts [start, start + len(prompts)) of a step's batch, sampled and scored by one rank:
    what `sample_share` returns and the ranks all-gather (`InProcessSource`)."""

    start: int
    prompts: list[list[int]]  # [p] token ids
    groups: list[list[SampledSequence]]  # [p][G]
    texts: list[str]  # [p·G] decoded completions
    rewards: list[float]  # [p·G]
    num_errors: float  # reward errors + timeouts
    sample_s: float
    reward_s: float


def step_problems(task: Task, step: int, config: TrainConfig) -> list[Problem]:
    """Batch `step`'s `rl.prompts_per_step` problems (the same on every rank)."""
    seed = step_seed(config.run.seed, step, 2)
    return task.problems("train", seed=seed, n=config.rl.prompts_per_step)


def step_sampling_params(step: int, config: TrainConfig) -> SamplingParams:
    """Batch `step`'s sampling parameters, seeded per (run seed, step)."""
    return SamplingParams(
        max_tokens=config.sampling.max_tokens,
        temperature=config.sampling.temperature,
        top_k=config.sampling.top_k,
        top_p=config.sampling.top_p,
        seed=step_seed(config.run.seed, step, 3),
    )


def sample_share(
    sampler: SamplingClient,
    task: Task,
    problems: Sequence[Problem],
    step: int,
    config: TrainConfig,
    indices: range,
) -> SampledShare:
    """Sample `rl.group_size` completions of `problems[i]` for i in `indices` and score them.

    Prompt i runs on random stream i (its index in the step's batch; `cispo.engine.sampler`), so
    its samples do not depend on which other prompts this call samples: the shares of any cut of
    the batch are the rows of the whole batch sampled at once (up to float rounding)."""
    tok, params = sampler.get_tokenizer(), step_sampling_params(step, config)
    t0 = time.perf_counter()
    prompts = [encode_prompt(tok, problems[i].prompt) for i in indices]
    futures = [
        sampler.sample(ModelInput.from_ints(p), config.rl.group_size, params, stream_id=i)
        for i, p in zip(indices, prompts, strict=True)
    ]
    groups = [f.result().sequences for f in futures]
    t1 = time.perf_counter()
    texts = [decode_completion(tok, s.tokens) for g in groups for s in g]
    flat_problems = [problems[i] for i in indices for _ in range(config.rl.group_size)]
    scored = score_all(task, flat_problems, texts, timeout_s=config.task.reward_timeout_s)
    return SampledShare(
        indices.start,
        prompts,
        groups,
        texts,
        list(scored.rewards),
        float(scored.num_errors + scored.num_timeouts),
        t1 - t0,
        time.perf_counter() - t1,
    )


def assemble_rollout(
    step: int,
    problems: list[Problem],
    shares: Sequence[SampledShare],
    config: TrainConfig,
    version: int,
) -> Rollout:
    """The batch from its shares (in any order; together they must cover every prompt once):
    advantages over the whole batch, datums in prompt order, metrics. `time/sample` and
    `time/reward` are the slowest share's; `rollout/share_prompts_max|min` the largest and
    smallest number of prompts a share sampled (one share: the whole batch)."""
    shares = sorted(shares, key=lambda s: s.start)
    covered = [s.start + i for s in shares for i in range(len(s.prompts))]
    if covered != list(range(len(problems))):
        raise ValueError(f"the shares cover prompts {covered}, not 0..{len(problems) - 1} once")
    prompts = [p for s in shares for p in s.prompts]
    groups = [g for s in shares for g in s.groups]
    flat_rewards = [r for s in shares for r in s.rewards]
    texts = [t for s in shares for t in s.texts]
    rewards = torch.tensor(flat_rewards, dtype=torch.float32).reshape(len(problems), -1)
    adv = compute_advantages(rewards, config.rl.advantage)
    datums = []
    # The advantages as Python floats in one conversion (not one tensor read per datum).
    for prompt, group, row in zip(prompts, groups, adv.advantages.tolist(), strict=True):
        if all(a == 0 for a in row):
            continue  # a group with no signal adds no gradient, only normaliser mass
        for seq, advantage in zip(group, row, strict=True):
            if seq.tokens:
                datums.append(
                    rl_datum(prompt, seq.tokens, seq.logprobs, advantage, old_logprobs=seq.logprobs)
                )
    correct = [r == 1.0 for r in flat_rewards]
    sizes = [len(s.prompts) for s in shares]
    metrics = adv.metrics | {
        "time/sample": max(s.sample_s for s in shares),
        "time/reward": max(s.reward_s for s in shares),
        "reward/mean": float(torch.nanmean(rewards)),
        "reward/accuracy": sum(correct) / len(correct),
        "reward/errors": sum(s.num_errors for s in shares),
        "rl/datums": float(len(datums)),
        "rl/tokens": float(sum(len(q.tokens) for g in groups for q in g)),
        "rollout/share_prompts_max": float(max(sizes)),
        "rollout/share_prompts_min": float(min(sizes)),
    }
    return Rollout(step, problems, texts, rewards, adv.advantages, datums, metrics, version=version)


def collect_rollout(sampler: SamplingClient, task: Task, step: int, config: TrainConfig) -> Rollout:
    """Sample `rl.group_size` completions for `rl.prompts_per_step` prompts, score, build datums
    (one share: the whole batch)."""
    problems = step_problems(task, step, config)
    share = sample_share(sampler, task, problems, step, config, range(len(problems)))
    return assemble_rollout(
        step,
        problems,
        [share],
        config,
        version=getattr(sampler, "version", 0),
    )


def minibatch_size(num_datums: int, config: TrainConfig) -> int:
    """Datums per optimizer step when a batch of `num_datums` is split `rl.minibatches` ways."""
    return math.ceil(num_datums / config.rl.minibatches) if num_datums else 0


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
    return [list(map(float, o["logprobs"].tolist())) for o in outputs]
