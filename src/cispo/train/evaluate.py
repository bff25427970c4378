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
    tok = sampler.get_tokenizer()
    greedy = SamplingParams(max_tokens=config.sampling.max_tokens, temperature=0.0, seed=0)
    futures = [
        sampler.sample(ModelInput.from_ints(encode_prompt(tok, p.prompt)), 1, greedy)
        for p in problems
    ]
    texts = [decode_completion(tok, f.result().sequences[0].tokens) for f in futures]
    scores = score_all(task, list(problems), texts, timeout_s=config.task.reward_timeout_s)
    metrics = {"eval/accuracy": sum(r == 1.0 for r in scores.rewards) / len(problems)}
    k = config.eval.pass_k
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
                    seed=1 + i,
                ),
            )
            for i, p in enumerate(problems)
        ]
        hits = 0
        for problem, future in zip(problems, futures, strict=True):
            texts = [decode_completion(tok, s.tokens) for s in future.result().sequences]
            rewards = score_all(task, [problem] * k, texts, timeout_s=config.task.reward_timeout_s)
            hits += any(r == 1.0 for r in rewards.rewards)
        metrics[f"eval/pass@{k}"] = hits / len(problems)
    return metrics
