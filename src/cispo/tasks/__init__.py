"""Verifiable tasks: prompts with known answers and exact verifiers (the `Task` protocol).

    task = make_task("arithmetic", num_terms=3)
    problems = task.problems("train", seed=0, n=64)
    reward = task.score(problems[0], completion)

`reasoning_gym` needs the optional package (pip install reasoning-gym), imported only when
that task is built.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cispo.tasks.arithmetic import ArithmeticTask
from cispo.tasks.base import Problem, Task
from cispo.tasks.jsonl import JsonlTask
from cispo.tasks.reasoning_gym import ReasoningGymTask

__all__ = [
    "TASKS",
    "ArithmeticTask",
    "JsonlTask",
    "Problem",
    "ReasoningGymTask",
    "Task",
    "make_task",
]


def make_task(name: str, **kwargs: Any) -> Task:
    """The task registered as `name`, built with `kwargs`."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid: {', '.join(TASKS)}")
    return TASKS[name](**kwargs)


TASKS: dict[str, Callable[..., Task]] = {
    "arithmetic": ArithmeticTask,
    "jsonl": JsonlTask,
    "reasoning_gym": ReasoningGymTask,
}
