"""Procedurally generated integer arithmetic, sized for a character-level model.

Prompt "37+45=", answer "82"; the model should write the answer then an end marker (newline or
EOS). `score` reads the completion up to the first end marker, strips whitespace and compares
the text exactly: 1.0 or 0.0. "82", "82\\n" and " 82 \\n..." score 1; "082", "82.0" and "823" 0.

Operands are drawn uniformly from [0, 10**digits), operators uniformly from `operators`;
`*` binds tighter than `+` and `-` (so "2+3*4=" is 14) and answers can be negative ("12-45=" is
"-33"). No parentheses, division or negative operands.

    task = ArithmeticTask(num_terms=3, operators="+-*")
    problems = task.problems("train", seed=0, n=64)

`instruction=True` phrases the same problems for a chat model: "What is 37+45? Answer with the
number only." A small instruct model rarely obeys the "only" (it writes "37 + 45 = 82" or "The
answer is 82."), so the verifier then reads the last integer of the completion's first line.
The bare expression decides a problem's split, so the split does not depend on `instruction`.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

from cispo.tasks.base import Problem, check_split, extract_answer, split_of

__all__ = ["ArithmeticTask", "evaluate", "last_integer"]

_INTEGER = re.compile(r"-?\d+")


def evaluate(operands: list[int], operators: list[str]) -> int:
    """Value of operands[0] op[0] operands[1] ... with `*` before `+`/`-` (no eval())."""
    total, sign, product = 0, 1, operands[0]
    for op, x in zip(operators, operands[1:], strict=True):
        if op == "*":
            product *= x
        else:
            total += sign * product
            sign, product = (1 if op == "+" else -1), x
    return total + sign * product


OPERATORS = "+-*"
"""The operators a problem can use."""


@dataclass(frozen=True, kw_only=True)
class ArithmeticTask:
    num_terms: int = 2
    """Operands per problem (>= 2)."""
    digits: int = 2
    """Each operand is drawn from [0, 10**digits)."""
    operators: str = "+-"
    """The operators to draw from, a non-empty subset of "+-*"."""
    test_fraction: float = 0.1
    """Share of all possible prompts that belong to the test split (hash of the expression text)."""
    instruction: bool = False
    """Chat-style prompt ("What is 37+45? Answer with the number only.") and a verifier that reads
    the last integer of the first line, for instruct models; False: "37+45=" and an exact match."""
    reverse_digits: bool = False
    """Write the answer's digits least-significant first, sign first ("37+45=" → "28", "12-45=" →
    "-33"): each digit then depends on two operand digits and a carry already written, which a
    small model learns far faster than most-significant-first (the "reversed output" of
    arithmetic-transformer studies, e.g. Lee et al., arXiv:2307.03381)."""
    name: str = field(default="arithmetic", init=False)

    def __post_init__(self) -> None:
        if self.instruction and self.reverse_digits:
            raise ValueError("instruction=True and reverse_digits=True do not combine")
        if self.num_terms < 2:
            raise ValueError(f"num_terms must be >= 2, got {self.num_terms}")
        if self.digits < 1:
            raise ValueError(f"digits must be >= 1, got {self.digits}")
        if not self.operators or set(self.operators) - set(OPERATORS):
            raise ValueError(
                f"operators must be a non-empty subset of {OPERATORS!r}, got {self.operators!r}"
            )
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction}")

    def problems(self, split: str, seed: int, n: int) -> list[Problem]:
        """n problems of `split`, drawn with replacement; deterministic in (split, seed, n)."""
        check_split(split)
        # A str seed is hashed with sha512 by `random`, so this is stable across processes.
        rng = random.Random(f"{self.name}/{split}/{seed}")
        out: list[Problem] = []
        # Rejection sampling on the split: about 1/test_fraction draws per test problem. The cap
        # only trips when a split holds (almost) no prompts, e.g. digits=1 with one operator.
        max_draws = 1000 + 1000 * n
        for _ in range(max_draws):
            if len(out) == n:
                break
            expression, problem = self._draw(rng)
            if split_of(expression, self.test_fraction) == split:
                out.append(problem)
        if len(out) < n:
            raise ValueError(
                f"found only {len(out)} of {n} {split!r} problems in {max_draws} draws; "
                "the problem space is too small for this test_fraction"
            )
        return out

    def _draw(self, rng: random.Random) -> tuple[str, Problem]:
        """The bare expression ("37+45=", which decides the split) and the problem."""
        operands = [rng.randrange(10**self.digits) for _ in range(self.num_terms)]
        operators = [rng.choice(self.operators) for _ in range(self.num_terms - 1)]
        text = str(operands[0])
        for op, x in zip(operators, operands[1:], strict=True):
            text += f"{op}{x}"
        prompt = f"What is {text}? Answer with the number only." if self.instruction else text + "="
        value = evaluate(operands, operators)
        answer = str(value)
        if self.reverse_digits:
            answer = ("-" if value < 0 else "") + str(abs(value))[::-1]
        problem = Problem(
            prompt=prompt,
            answer=answer,
            metadata={"operands": operands, "operators": operators},
        )
        return text + "=", problem

    def score(self, problem: Problem, completion: str) -> float:
        answer = extract_answer(completion)
        if self.instruction:
            answer = last_integer(answer) or ""
        return 1.0 if answer == problem.answer else 0.0


def last_integer(text: str) -> str | None:
    """The last integer written in `text` (a leading minus included), or None.

    >>> last_integer("37 + 45 = 82.")
    '82'
    """
    found = _INTEGER.findall(text)
    return found[-1] if found else None
