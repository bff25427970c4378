"""Held-out evaluation: greedy accuracy, and pass@k at the sampling temperature."""

from __future__ import annotations

from collections.abc import Sequence

from cispo.client import ModelInput, SamplingClient, SamplingParams
from cispo.config import TrainConfig
from cispo.prompts import decode_completion, encode_prompt
from cispo.rewards import score_all
from cispo.tasks import Problem, Task


def evaluate(
    sampler: SamplingClient, task: Task, problems: Sequence[Problem], config: TrainConfig
) -> dict[str, float]:
    """Greedy accuracy on held-out problems (+ pass@k at the sampling temperature if asked)."""
    return rates(evaluate_counts(sampler, task, problems, config), config)


def rates(counts: Sequence[float], config: TrainConfig) -> dict[str, float]:
    """The metrics of `evaluate` from (problems, greedy hits, pass@k hits) counts, which add up
    across shares of the problems."""
    n, greedy, passed = counts
    metrics = {"eval/accuracy": greedy / n}
    if config.eval.pass_k > 0:
        metrics[f"eval/pass@{config.eval.pass_k}"] = passed / n
    return metrics


def evaluate_counts(
    sampler: SamplingClient,
    task: Task,
    problems: Sequence[Problem],
    config: TrainConfig,
    *,
    first_index: int = 0,
) -> tuple[float, float, float]:
    """(problems, greedy hits, pass@k hits) on `problems`, the held-out problems
    [first_index, first_index + len(problems)) of an evaluation (a rank's share: problem i
    samples pass@k on seed 1 + i whatever the share, so shares add up to the whole)."""
    tok = sampler.get_tokenizer()
    greedy = SamplingParams(max_tokens=config.sampling.max_tokens, temperature=0.0, seed=0)
    futures = [
        sampler.sample(ModelInput.from_ints(encode_prompt(tok, p.prompt)), 1, greedy)
        for p in problems
    ]
    texts = [decode_completion(tok, f.result().sequences[0].tokens) for f in futures]
    scores = score_all(task, list(problems), texts, timeout_s=config.task.reward_timeout_s)
    greedy_hits = sum(r == 1.0 for r in scores.rewards)
    k, hits = config.eval.pass_k, 0
    if k > 0:
        # One seed per problem: a seeded request samples on its own stream, so a shared seed
        # would give every problem the same uniforms (correlated pass@k across problems).
        futures = [
            sampler.sample(
                ModelInput.from_ints(encode_prompt(tok, p.prompt)),
                k,
                SamplingParams(
                    max_tokens=config.sampling.max_tokens,
                    temperature=config.sampling.temperature,
                    seed=1 + first_index + i,
                ),
            )
            for i, p in enumerate(problems)
        ]
        for problem, future in zip(problems, futures, strict=True):
            texts = [decode_completion(tok, s.tokens) for s in future.result().sequences]
            rewards = score_all(task, [problem] * k, texts, timeout_s=config.task.reward_timeout_s)
            hits += any(r == 1.0 for r in rewards.rewards)
    return float(len(problems)), float(greedy_hits), float(hits)
