"""Reward evaluation that survives bad reward functions.

`score_all` calls `task.score(problem, completion)` for every completion. A call that raises,
returns something other than a finite number, or runs past `timeout_s` does not stop the run:
it is counted, logged (the first few), and scored NaN. `cispo.advantages` leaves NaN rewards
out of every group statistic and gives them advantage 0, so a failed verdict neither rewards
nor punishes the completion, and it does not drag its group's mean towards 0 the way scoring
it 0.0 would.

Where the calls run:
- The built-in verifiers (`ArithmeticTask`, `JsonlTask`) are a few string operations; they run
  inline in the calling thread, still guarded against exceptions but without a time-out.
- Any other task runs in daemon threads, at most `max_workers` at a time, each call with its
  own `timeout_s` clock. A call past its time-out is abandoned: it is scored NaN, and its
  thread keeps running in the background until the function returns (Python cannot stop a
  thread); its late result is ignored. If it never returns, it costs one idle or busy thread
  for the rest of the process, and a busy one competes for the GIL.

Why threads and not processes: a `fork`ed worker could be killed, but fork is unsafe in a
process that already runs threads (torch's intra-op pool, tokenizers, the sampler), is not
available on Windows and is not the default on macOS; `spawn` would need the task to pickle
and costs ~100 ms per worker. Why not `concurrent.futures.ThreadPoolExecutor`: its workers are
joined at interpreter exit, so one truly hung verifier would keep the process from exiting.
Daemon threads are not joined.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cispo.tasks.arithmetic import ArithmeticTask
from cispo.tasks.base import Problem, Task
from cispo.tasks.jsonl import JsonlTask

__all__ = ["MAX_ERROR_MESSAGES", "RewardOutput", "score_all"]

logger = logging.getLogger(__name__)

MAX_ERROR_MESSAGES = 5
"""How many failure messages `RewardOutput.errors` keeps (and the log shows) per call."""

# Tasks whose `score` is a few string operations: scored inline, no thread, no time-out.
_INLINE_TASKS = (ArithmeticTask, JsonlTask)


@dataclass(frozen=True)
class RewardOutput:
    rewards: list[float]
    """One reward per completion, in input order; NaN where scoring failed or timed out."""
    num_errors: int
    """Calls that raised or returned something other than a finite number."""
    num_timeouts: int
    """Calls abandoned after `timeout_s`."""
    errors: list[str]
    """The first `MAX_ERROR_MESSAGES` failure messages, e.g. "completion 3: ValueError: ..."."""


def _as_reward(value: object) -> float:
    """`value` as a finite float, or ValueError (bool counts as 0/1)."""
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    raise ValueError(f"reward function returned {value!r}, not a finite number")


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


# One call's outcome: (reward, None, ""), or (NaN, "error" or "timeout", message).
_Outcome = tuple[float, str | None, str]


def _call(fn: Callable[[], object]) -> _Outcome:
    try:
        return _as_reward(fn()), None, ""
    except Exception as e:  # any verifier bug becomes a NaN reward, by design
        return math.nan, "error", _describe(e)


def _run_inline(calls: list[Callable[[], object]]) -> list[_Outcome]:
    return [_call(fn) for fn in calls]


def _run_threaded(
    calls: list[Callable[[], object]], timeout_s: float, max_workers: int
) -> list[_Outcome]:
    """Each call in a daemon thread, at most `max_workers` running, each with its own deadline."""
    done: queue.SimpleQueue[tuple[int, _Outcome]] = queue.SimpleQueue()

    def worker(index: int, fn: Callable[[], object]) -> None:
        try:
            outcome = _call(fn)
        except BaseException as e:  # SystemExit etc. from the verifier: report, don't vanish
            outcome = (math.nan, "error", _describe(e))
        done.put((index, outcome))

    outcomes: list[_Outcome | None] = [None] * len(calls)
    waiting = list(range(len(calls)))[::-1]  # pop() takes the lowest index first
    deadlines: dict[int, float] = {}  # running calls -> monotonic deadline
    while waiting or deadlines:
        while waiting and len(deadlines) < max_workers:
            index = waiting.pop()
            deadlines[index] = time.monotonic() + timeout_s
            name = f"cispo-reward-{index}"
            threading.Thread(
                target=worker, args=(index, calls[index]), name=name, daemon=True
            ).start()
        try:
            index, outcome = done.get(timeout=max(0.0, min(deadlines.values()) - time.monotonic()))
        except queue.Empty:
            now = time.monotonic()
            for index, deadline in list(deadlines.items()):
                if deadline <= now:
                    outcomes[index] = (math.nan, "timeout", f"timed out after {timeout_s:g} s")
                    del deadlines[index]
            continue
        if index in deadlines:  # else: the late result of an abandoned call
            outcomes[index] = outcome
            del deadlines[index]
    return [o for o in outcomes if o is not None]


def score_all(
    task: Task,
    problems: Sequence[Problem],
    completions: Sequence[str],
    *,
    timeout_s: float = 5.0,
    inline: bool | None = None,
    max_workers: int = 8,
) -> RewardOutput:
    """Score completions[i] against problems[i]; failures become NaN and are counted.

    Args:
        timeout_s: per-call limit for threaded scoring (ignored inline).
        inline: run in the calling thread (no time-out). None: inline only for the built-in
            verifiers (`ArithmeticTask`, `JsonlTask`).
        max_workers: threads running scoring calls at once (threaded scoring only).
    """
    if len(problems) != len(completions):
        raise ValueError(f"{len(problems)} problems but {len(completions)} completions")
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    if max_workers < 1:
        raise ValueError(f"max_workers must be >= 1, got {max_workers}")
    if inline is None:
        inline = isinstance(task, _INLINE_TASKS)

    def bind(problem: Problem, completion: str) -> Callable[[], object]:
        return lambda: task.score(problem, completion)

    calls = [bind(p, c) for p, c in zip(problems, completions, strict=True)]
    outcomes = _run_inline(calls) if inline else _run_threaded(calls, timeout_s, max_workers)

    failures = [(i, kind, message) for i, (_, kind, message) in enumerate(outcomes) if kind]
    num_timeouts = sum(kind == "timeout" for _, kind, _ in failures)
    errors = [f"completion {i}: {message}" for i, _, message in failures[:MAX_ERROR_MESSAGES]]
    for message in errors:
        logger.warning("reward for %s (task %s); scored NaN", message, task.name)
    if len(failures) > MAX_ERROR_MESSAGES:
        logger.warning(
            "%d more reward failures (task %s) not shown",
            len(failures) - MAX_ERROR_MESSAGES,
            task.name,
        )
    return RewardOutput(
        rewards=[reward for reward, _, _ in outcomes],
        num_errors=len(failures) - num_timeouts,
        num_timeouts=num_timeouts,
        errors=errors,
    )
