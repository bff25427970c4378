"""The Task protocol, the Problem record, and helpers every task shares.

A task hands out prompts with known answers and verifies completions exactly. Splits are
disjoint by construction: a problem's split is a pure function of its prompt text
(`split_of`), so the same prompt can never be both a train and a test problem, whatever the
seed or sample size.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = [
    "END_MARKERS",
    "SPLITS",
    "Problem",
    "Task",
    "TaskDataError",
    "check_split",
    "extract_answer",
    "split_of",
]

SPLITS = ("train", "test")

# Where a completion's answer stops: the first newline or end-of-sequence-like marker, in case
# the sampler returns the EOS text instead of stopping before it.
END_MARKERS = ("\n", "<|endoftext|>", "<|im_end|>", "<|eot_id|>", "</s>", "<eos>")


class TaskDataError(ValueError):
    """A task's data is unusable (a malformed file, a line too long); the message names the file,
    the line and what is wrong. The command line prints it without a traceback."""


@dataclass(frozen=True)
class Problem:
    prompt: str
    """What the model is conditioned on, e.g. "37+45="."""
    answer: str
    """The reference answer, e.g. "82"."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """Task-specific details (operands, source line, the original item, ...)."""


class Task(Protocol):
    @property
    def name(self) -> str:
        """Short identifier used in logs and metrics, e.g. "arithmetic"."""
        ...

    def problems(self, split: str, seed: int, n: int) -> list[Problem]:
        """n problems of `split` ("train" or "test"); the same arguments give the same list."""
        ...

    def score(self, problem: Problem, completion: str) -> float:
        """Reward of `completion` (the text after the prompt) for `problem`."""
        ...


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")


def split_of(prompt: str, test_fraction: float) -> str:
    """ "test" for a stable `test_fraction` of all prompts, chosen by hashing the prompt text.

    sha256, not `hash()`: Python's string hash changes from process to process.
    """
    bucket = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "big") / 2.0**64
    return "test" if bucket < test_fraction else "train"


def extract_answer(completion: str, end_markers: tuple[str, ...] = END_MARKERS) -> str:
    """The completion up to the first end marker, without surrounding whitespace.

    >>> extract_answer(" 82\\nthe rest")
    '82'
    """
    end = len(completion)
    for marker in end_markers:
        index = completion.find(marker)
        if index != -1:
            end = min(end, index)
    return completion[:end].strip()
