"""score_all: failures and hangs become counted NaN rewards; the run goes on."""

import logging
import math
import threading
import time

import pytest
import torch

from cispo.advantages import compute_advantages
from cispo.rewards import MAX_ERROR_MESSAGES, RewardOutput, score_all
from cispo.tasks.arithmetic import ArithmeticTask
from cispo.tasks.base import Problem


class ScriptedTask:
    """A user task whose verdict per completion is scripted: a number, 'raise', 'hang', ..."""

    name = "scripted"

    def __init__(self, hang_s: float = 2.0) -> None:
        self.hang_s = hang_s
        self.threads: list[str] = []

    def problems(self, split: str, seed: int, n: int) -> list[Problem]:
        return [Problem(prompt=str(i), answer="") for i in range(n)]

    def score(self, problem: Problem, completion: str) -> float:
        self.threads.append(threading.current_thread().name)
        if completion == "raise":
            raise ValueError(f"cannot parse problem {problem.prompt}")
        if completion == "hang":
            time.sleep(self.hang_s)
            return 1.0
        if completion == "inf":
            return math.inf
        if completion == "text":
            return "1.0"  # type: ignore[return-value]  # the bug under test
        return float(completion)


def run(completions: list[str]) -> tuple[ScriptedTask, RewardOutput]:
    task = ScriptedTask()
    return task, score_all(task, task.problems("train", 0, len(completions)), completions)


def test_raising_reward_function_is_counted_and_scored_nan(
    caplog: pytest.LogCaptureFixture,
) -> None:
    task = ScriptedTask()
    problems = task.problems("train", 0, 3)
    with caplog.at_level(logging.WARNING, logger="cispo.rewards"):
        out = score_all(task, problems, ["1", "raise", "0.5"])
    assert out.rewards[0] == 1.0 and out.rewards[2] == 0.5
    assert math.isnan(out.rewards[1])
    assert (out.num_errors, out.num_timeouts) == (1, 0)
    assert out.errors == ["completion 1: ValueError: cannot parse problem 1"]
    assert "cannot parse problem 1" in caplog.text


def test_hanging_reward_function_is_abandoned_after_timeout() -> None:
    task = ScriptedTask(hang_s=2.0)
    problems = task.problems("train", 0, 4)
    start = time.monotonic()
    out = score_all(task, problems, ["1", "hang", "0", "hang"], timeout_s=0.2)
    elapsed = time.monotonic() - start
    # Both hangs run concurrently (max_workers=8) and are abandoned at ~0.2 s, long before the
    # 2 s sleep ends; 1.0 s leaves room for a slow machine.
    assert elapsed < 1.0
    assert out.rewards[0] == 1.0 and out.rewards[2] == 0.0
    assert math.isnan(out.rewards[1]) and math.isnan(out.rewards[3])
    assert (out.num_errors, out.num_timeouts) == (0, 2)
    assert out.errors[0] == "completion 1: timed out after 0.2 s"


def test_each_call_gets_its_own_timeout_when_workers_are_busy() -> None:
    # One worker: the fast calls queued behind a hang still run, each with a fresh clock.
    task = ScriptedTask(hang_s=2.0)
    problems = task.problems("train", 0, 3)
    start = time.monotonic()
    out = score_all(task, problems, ["hang", "1", "0"], timeout_s=0.2, max_workers=1)
    assert time.monotonic() - start < 1.5
    assert math.isnan(out.rewards[0]) and out.rewards[1:] == [1.0, 0.0]
    assert out.num_timeouts == 1


@pytest.mark.parametrize("completion", ["inf", "text"])
def test_non_finite_or_non_numeric_reward_is_an_error(completion: str) -> None:
    _, out = run(["1", completion])
    assert math.isnan(out.rewards[1])
    assert out.num_errors == 1
    assert "not a finite number" in out.errors[0]


def test_keeps_only_the_first_few_messages() -> None:
    _, out = run(["raise"] * (MAX_ERROR_MESSAGES + 3))
    assert out.num_errors == MAX_ERROR_MESSAGES + 3
    assert len(out.errors) == MAX_ERROR_MESSAGES


def test_user_tasks_run_in_worker_threads_and_builtin_tasks_inline() -> None:
    task, _ = run(["1", "0"])
    assert all(name.startswith("cispo-reward-") for name in task.threads)

    calling_thread = threading.current_thread().name
    seen: list[str] = []

    class RecordingArithmetic(ArithmeticTask):
        def score(self, problem: Problem, completion: str) -> float:
            seen.append(threading.current_thread().name)
            return super().score(problem, completion)

    arith = RecordingArithmetic()
    problems = arith.problems("train", 0, 2)
    out = score_all(arith, problems, [problems[0].answer, "nope"])
    assert out.rewards == [1.0, 0.0]
    assert seen == [calling_thread, calling_thread]
    score_all(arith, problems, ["1", "2"], inline=False)
    assert all(name.startswith("cispo-reward-") for name in seen[2:])


def test_inline_scoring_still_survives_exceptions() -> None:
    task = ScriptedTask()
    out = score_all(task, task.problems("train", 0, 2), ["raise", "1"], inline=True)
    assert math.isnan(out.rewards[0]) and out.rewards[1] == 1.0 and out.num_errors == 1


def test_failed_rewards_get_zero_advantage_and_stay_out_of_the_group_baseline() -> None:
    # Group of 4: rewards [1, NaN, 0, 0]. Had the failure been scored 0, dr_grpo's mean would be
    # 0.25 and the success would get 0.75; with NaN excluded the mean is 1/3 and it gets 2/3.
    _, out = run(["1", "raise", "0", "0"])
    rewards = torch.tensor([out.rewards])
    adv = compute_advantages(rewards, "dr_grpo")
    torch.testing.assert_close(adv.advantages, torch.tensor([[2 / 3, 0.0, -1 / 3, -1 / 3]]))
    assert adv.num_nan_rewards == 1


def test_rejects_mismatched_lengths_and_bad_timeout() -> None:
    task = ScriptedTask()
    with pytest.raises(ValueError, match="2 problems but 1 completions"):
        score_all(task, task.problems("train", 0, 2), ["1"])
    with pytest.raises(ValueError, match="timeout_s must be > 0"):
        score_all(task, task.problems("train", 0, 1), ["1"], timeout_s=0)
