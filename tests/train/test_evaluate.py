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
from cispo.train.evaluate import evaluate
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
