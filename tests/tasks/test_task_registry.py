"""The TASKS registry and make_task."""

import pytest

from cispo.tasks import TASKS, ArithmeticTask, make_task


def test_make_task_passes_kwargs() -> None:
    task = make_task("arithmetic", num_terms=3)
    assert isinstance(task, ArithmeticTask) and task.num_terms == 3
    assert task.name == "arithmetic"


def test_unknown_task_lists_valid_names() -> None:
    with pytest.raises(
        ValueError, match="unknown task 'gsm9k'; valid: arithmetic, jsonl, reasoning_gym"
    ):
        make_task("gsm9k")


def test_registry_names() -> None:
    assert list(TASKS) == ["arithmetic", "jsonl", "reasoning_gym"]
