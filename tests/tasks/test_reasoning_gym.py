"""ReasoningGymTask: the lazy import, compact prompts and scoring through reasoning-gym."""

import builtins
import re
from typing import Any

import pytest

from cispo.tasks.base import split_of
from cispo.tasks.reasoning_gym import ReasoningGymTask


def test_missing_package_error_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def no_reasoning_gym(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "reasoning_gym" or name.startswith("reasoning_gym."):
            raise ImportError("No module named 'reasoning_gym'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_reasoning_gym)
    with pytest.raises(ImportError, match="pip install reasoning-gym"):
        ReasoningGymTask("basic_arithmetic")


def test_importing_cispo_tasks_does_not_import_reasoning_gym() -> None:
    import subprocess
    import sys

    code = "import sys, cispo.tasks; print('reasoning_gym' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_basic_arithmetic_compact_prompt_and_score() -> None:
    pytest.importorskip("reasoning_gym")
    task = ReasoningGymTask(
        "basic_arithmetic",
        compact_prompt=True,
        config={"max_terms": 3, "max_digits": 2, "operators": ("+", "-", "*")},
    )
    problems = task.problems("train", seed=0, n=20)
    for p in problems:
        entry = p.metadata["entry"]
        assert p.prompt == entry["metadata"]["expression"].replace(" ", "") + "="
        assert re.fullmatch(r"[0-9+\-*()]+=", p.prompt)
        assert len(p.prompt) < len(entry["question"])
        # The prompt is an expression Python evaluates to the reference answer.
        assert eval(p.prompt[:-1]) == int(p.answer)  # trusted: checked by the fullmatch above
        assert task.score(p, p.answer + "\nanything") == 1.0
        assert task.score(p, "x\n") == 0.0


def test_leg_counting_compact_prompt() -> None:
    pytest.importorskip("reasoning_gym")
    task = ReasoningGymTask("leg_counting", compact_prompt=True)
    (p,) = task.problems("test", seed=1, n=1)
    animals = p.metadata["entry"]["metadata"]["animals"]
    assert p.prompt == "legs:" + ",".join(f"{n} {a}" for a, n in animals.items()) + "="
    assert task.score(p, p.answer) == 1.0


def test_splits_are_disjoint_and_deterministic() -> None:
    pytest.importorskip("reasoning_gym")
    task = ReasoningGymTask("chain_sum", compact_prompt=True, config={"max_digits": 2})
    train = task.problems("train", 0, 200)
    test = task.problems("test", 0, 50)
    assert train == task.problems("train", 0, 200)
    assert not {p.prompt for p in train} & {p.prompt for p in test}
    assert all(split_of(p.prompt, 0.1) == "test" for p in test)


def test_original_question_is_the_default_prompt() -> None:
    pytest.importorskip("reasoning_gym")
    (p,) = ReasoningGymTask("leg_counting").problems("train", 0, 1)
    assert p.prompt == p.metadata["entry"]["question"]


def test_compact_prompt_true_without_builtin_lists_the_builtins() -> None:
    pytest.importorskip("reasoning_gym")
    with pytest.raises(ValueError, match="no built-in compact prompt for 'spell_backward'"):
        ReasoningGymTask("spell_backward", compact_prompt=True)
    task = ReasoningGymTask("spell_backward", compact_prompt=lambda item: "rev:x=")
    assert task.problems("train", 0, 1)[0].prompt == "rev:x="
