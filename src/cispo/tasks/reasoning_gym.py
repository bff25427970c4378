"""Adapter for the procedural datasets of the optional `reasoning-gym` package.

    pip install reasoning-gym
    task = ReasoningGymTask("basic_arithmetic", compact_prompt=True, config={"max_terms": 3})

Problems come from `reasoning_gym.create_dataset(dataset, size=..., seed=..., **config)`; the
item dict is kept in `Problem.metadata["entry"]` and scoring calls the dataset's own
`score_answer`. Its default scorer gives partial credit (len(answer) / len(completion) when the
answer is a substring), so rewards can lie strictly between 0 and 1. The completion is cut at
its first newline / EOS marker before scoring.

reasoning-gym questions are English paragraphs, far too long for a tiny character model.
`compact_prompt` replaces them with a short prompt built from the item's metadata:
`COMPACT_PROMPTS` holds verified ones ("basic_arithmetic", "chain_sum": "(56+-33)-84=";
"leg_counting": "legs:13 woodlouse,8 leech="), or pass any callable item -> str.

Splits are disjoint by hashing the prompt text the model sees (compact or not), so train and
test also differ after compaction. The package is imported only when the task is built.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from typing import Any

from cispo.tasks.base import Problem, check_split, extract_answer, split_of

__all__ = ["COMPACT_PROMPTS", "ReasoningGymTask", "expression_prompt", "leg_counting_prompt"]

CompactPrompt = Callable[[Mapping[str, Any]], str]


def expression_prompt(item: Mapping[str, Any]) -> str:
    """'( 56 + -33 ) - 84' -> '(56+-33)-84=' (basic_arithmetic, chain_sum)."""
    return str(item["metadata"]["expression"]).replace(" ", "") + "="


def leg_counting_prompt(item: Mapping[str, Any]) -> str:
    """{'woodlouse': 13, 'leech': 8} -> 'legs:13 woodlouse,8 leech='."""
    animals = item["metadata"]["animals"]
    return "legs:" + ",".join(f"{count} {animal}" for animal, count in animals.items()) + "="


COMPACT_PROMPTS: dict[str, CompactPrompt] = {
    "basic_arithmetic": expression_prompt,
    "chain_sum": expression_prompt,
    "leg_counting": leg_counting_prompt,
}


def _import_reasoning_gym() -> Any:
    try:
        import reasoning_gym
    except ImportError as e:
        raise ImportError(
            "ReasoningGymTask needs the optional reasoning-gym package: pip install reasoning-gym"
        ) from e
    return reasoning_gym


class ReasoningGymTask:
    """One reasoning-gym dataset as a `Task`."""

    def __init__(
        self,
        dataset: str,
        *,
        config: Mapping[str, Any] | None = None,
        compact_prompt: CompactPrompt | bool = False,
        test_fraction: float = 0.1,
    ) -> None:
        """
        Args:
            dataset: a reasoning-gym dataset name, e.g. "basic_arithmetic", "leg_counting".
            config: keyword arguments of that dataset's config (e.g. {"max_terms": 3}).
            compact_prompt: True for the built-in `COMPACT_PROMPTS[dataset]`, a callable
                item -> prompt for your own, False for the original question text.
            test_fraction: share of prompts (by hash of the prompt text) in the test split.
        """
        self._rg = _import_reasoning_gym()
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
        if compact_prompt is True:
            if dataset not in COMPACT_PROMPTS:
                raise ValueError(
                    f"no built-in compact prompt for {dataset!r}; built-in: "
                    f"{', '.join(COMPACT_PROMPTS)}; or pass a callable item -> str"
                )
            compact_prompt = COMPACT_PROMPTS[dataset]
        self.name = f"reasoning_gym/{dataset}"
        self.dataset = dataset
        self.config = dict(config or {})
        self.test_fraction = test_fraction
        self._compact: CompactPrompt | None = compact_prompt or None
        # Items are generated lazily per index, so a huge `size` costs nothing. This instance
        # also does the scoring (score_answer may read the dataset's config).
        self._scorer = self._dataset(seed=0)

    def _dataset(self, seed: int) -> Any:
        return self._rg.create_dataset(self.dataset, size=2**31 - 1, seed=seed, **self.config)

    def problems(self, split: str, seed: int, n: int) -> list[Problem]:
        """n problems of `split`: items 0, 1, 2, ... of a dataset seeded from (split, seed),
        keeping those whose prompt hashes into `split`."""
        check_split(split)
        digest = hashlib.sha256(f"{split}/{seed}".encode()).digest()
        source = self._dataset(seed=int.from_bytes(digest[:4], "big") >> 1)
        out: list[Problem] = []
        max_draws = 1000 + 1000 * n
        for index in range(max_draws):
            if len(out) == n:
                break
            item = source[index]
            prompt = self._compact(item) if self._compact else str(item["question"])
            if split_of(prompt, self.test_fraction) == split:
                out.append(
                    Problem(
                        prompt=prompt,
                        answer=str(item["answer"]),
                        metadata={"dataset": self.dataset, "entry": item},
                    )
                )
        if len(out) < n:
            raise ValueError(f"found only {len(out)} of {n} {split!r} problems")
        return out

    def score(self, problem: Problem, completion: str) -> float:
        entry = problem.metadata["entry"]
        return float(self._scorer.score_answer(answer=extract_answer(completion), entry=entry))
