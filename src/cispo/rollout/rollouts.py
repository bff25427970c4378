"""One rollout batch: prompts → samples → rewards → advantages → datums, through a sampling client.

`collect_rollout` samples `rl.group_size` completions for `rl.prompts_per_step` prompts from a
`SamplingClient`, scores them, computes advantages and builds datums. The helpers below reshape a
batch's datums for the update (`minibatch_size`, `with_old_logprobs`); the update itself is
`cispo.train.update.train_on_rollout`.
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
    # The advantages as Python floats in one conversion (not one tensor read per datum).
    for prompt, group, row in zip(prompts, groups, adv.advantages.tolist(), strict=True):
        if all(a == 0 for a in row):
            continue  # a group with no signal adds no gradient, only normaliser mass
        for seq, advantage in zip(group, row, strict=True):
            if seq.tokens:
                datums.append(
                    rl_datum(prompt, seq.tokens, seq.logprobs, advantage, old_logprobs=seq.logprobs)
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
