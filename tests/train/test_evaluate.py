"""Held-out evaluation (`cispo.train.evaluate`): greedy accuracy and pass@k."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, cast

from cispo.client import SamplingClient
from cispo.client.futures import APIFuture, completed
from cispo.config import TrainConfig
from cispo.prompts import encode_prompt
from cispo.tasks import ArithmeticTask
from cispo.tokenizer import build_char_tokenizer
from cispo.train.evaluate import evaluate, evaluate_counts, rates
from cispo.types import ModelInput, SampledSequence, SampleResponse, SamplingParams


class ScriptedSampler:
    """Answers problem i's j-th pass@k sample correctly iff (i + j) % 3 == 0; greedy: only i = 0.

    Records every request's (prompt, n, params), so the test sees what `evaluate` asked for.
    """

    def __init__(self, answers: dict[tuple[int, ...], str]) -> None:
        self.tok = build_char_tokenizer()
        self.answers = answers
        self.order = list(answers)
        self.requests: list[tuple[tuple[int, ...], int, SamplingParams]] = []

    def get_tokenizer(self) -> Any:
        return self.tok

    def sample(
        self, prompt: ModelInput, num_samples: int, params: SamplingParams
    ) -> APIFuture[SampleResponse]:
        key = tuple(prompt.to_ints())
        self.requests.append((key, num_samples, params))
        i = self.order.index(key)
        right = self.tok.encode(self.answers[key], add_special_tokens=False)
        wrong = self.tok.encode("x", add_special_tokens=False)
        greedy = params.temperature == 0
        hits = [(i == 0) if greedy else (i + j) % 3 == 0 for j in range(num_samples)]
        return completed(
            SampleResponse(
                [
                    SampledSequence(
                        tokens=right if h else wrong, logprobs=[0.0], stop_reason="stop"
                    )
                    for h in hits
                ]
            )
        )


def test_pass_at_k_counts_a_problem_once_and_draws_each_on_its_own_seed() -> None:
    task = ArithmeticTask()
    problems = task.problems("test", seed=0, n=6)
    tok = build_char_tokenizer()
    sampler = ScriptedSampler({tuple(encode_prompt(tok, p.prompt)): p.answer for p in problems})
    config = TrainConfig()
    config = replace(config, eval=replace(config.eval, pass_k=2))
    # problem i is hit iff (i + j) % 3 == 0 for j in (0, 1): i = 0, 2, 3, 5
    metrics = evaluate(cast(SamplingClient, sampler), task, problems, config)
    assert metrics["eval/accuracy"] == 1 / 6
    assert metrics["eval/pass@2"] == 4 / 6
    sampled = [params for _, n, params in sampler.requests if n == 2]
    assert len(sampled) == 6 and all(p.temperature == config.sampling.temperature for p in sampled)
    # A seeded request samples on its own stream: one shared seed would give every problem the
    # same uniforms.
    assert len({p.seed for p in sampled}) == 6


def test_shares_of_the_problems_add_up_to_the_whole_evaluation() -> None:
    """What each rank does under torchrun (`cispo.train.loop.sharded_evaluate`): the counts of
    [0, 2) and [2, 6), each share on its global problem indices, give the whole set's metrics
    and the same per-problem pass@k seeds."""
    task = ArithmeticTask()
    problems = task.problems("test", seed=0, n=6)
    tok = build_char_tokenizer()
    answers = {tuple(encode_prompt(tok, p.prompt)): p.answer for p in problems}
    config = replace(TrainConfig(), eval=replace(TrainConfig().eval, pass_k=2))
    whole = ScriptedSampler(answers)
    expected = evaluate(cast(SamplingClient, whole), task, problems, config)
    shares = ScriptedSampler(answers)
    counts = [
        evaluate_counts(cast(SamplingClient, shares), task, problems[a:b], config, first_index=a)
        for a, b in ((0, 2), (2, 6))
    ]
    assert [c[0] for c in counts] == [2.0, 4.0]
    assert rates([sum(c) for c in zip(*counts, strict=True)], config) == expected

    def seeds(sampler: ScriptedSampler) -> list[tuple[tuple[int, ...], int, int | None]]:
        return sorted((prompt, n, params.seed) for prompt, n, params in sampler.requests)

    assert seeds(shares) == seeds(whole)  # each problem, greedy and pass@k, on the same seed
