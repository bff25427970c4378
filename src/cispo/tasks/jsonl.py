"""Problems from JSONL files, checked by a named verifier.

Each line is a UTF-8 JSON object with a string `prompt` and an `answer` (string or number); any
other field goes to `Problem.metadata`. Blank lines are skipped. The whole file is read and
checked when the task is built, so a bad line fails at start-up with a `TaskDataError`
"path:line: ..." rather than in the middle of a run. A line longer than `max_line_bytes` is
refused as it is read, before anything tokenizes it (one 50 MB line once took a run to 12 GB
inside the tokenizer).

Splits: with `test_path`, `path` is the train split and `test_path` the test split (their
disjointness is the user's responsibility). Without it, one file is split by hashing each
prompt (`test_fraction` of prompts go to test).

    task = JsonlTask("data/gsm8k.jsonl", verifier="numeric")
"""

from __future__ import annotations

import itertools
import json
import math
import random
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from cispo.tasks.base import (
    END_MARKERS,
    Problem,
    TaskDataError,
    check_split,
    extract_answer,
    split_of,
)

__all__ = ["DEFAULT_MAX_LINE_BYTES", "VERIFIERS", "JsonlTask", "contains", "exact", "numeric"]

DEFAULT_MAX_LINE_BYTES = 1 << 20
"""1 MiB: hundreds of times a long math or code prompt, far below what hurts a tokenizer."""

# Numbers as written in answers: optional sign, digits with optional thousands commas, optional
# decimals and exponent ("-1,234.5e-3"). The comma form needs groups of exactly three digits so
# that "3,4" reads as two numbers.
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|[-+]?\.\d+")
NUMERIC_REL_TOL = 1e-6
NUMERIC_ABS_TOL = 1e-9
_EOS_MARKERS = tuple(m for m in END_MARKERS if m != "\n")


def last_number(text: str) -> float | None:
    """The last number written in `text`, or None."""
    matches = _NUMBER.findall(text)
    return float(matches[-1].replace(",", "")) if matches else None


def _until_eos(completion: str) -> str:
    """The completion up to an EOS-like marker; unlike `extract_answer`, newlines are kept."""
    return extract_answer(completion, end_markers=_EOS_MARKERS)


def exact(completion: str, answer: str) -> float:
    """1.0 if the completion's first line, stripped, equals the stripped answer."""
    return 1.0 if extract_answer(completion) == answer.strip() else 0.0


def numeric(completion: str, answer: str) -> float:
    """1.0 if the last number in the completion equals the answer's last number within
    rel_tol=1e-6, abs_tol=1e-9 (so "x = 1,234." matches "1234")."""
    got, want = last_number(_until_eos(completion)), last_number(answer)
    if got is None or want is None:
        return 0.0
    return 1.0 if math.isclose(got, want, rel_tol=NUMERIC_REL_TOL, abs_tol=NUMERIC_ABS_TOL) else 0.0


def contains(completion: str, answer: str) -> float:
    """1.0 if the stripped answer occurs anywhere in the completion (before an EOS marker)."""
    return 1.0 if answer.strip() in _until_eos(completion) else 0.0


def _lines(path: Path, max_line_bytes: int) -> Iterator[tuple[str, str]]:
    """("path:line", text) for each line of `path`, decoded as UTF-8; a line longer than
    `max_line_bytes` (without its newline) is an error before more than that is read."""
    try:
        f = path.open("rb")
    except OSError as e:
        raise TaskDataError(f"{path}: cannot read the JSONL file: {e.strerror}") from None
    with f:
        for line_number in itertools.count(1):
            raw = f.readline(max_line_bytes + 2)  # room for the content and "\r\n"
            if not raw:
                return
            where = f"{path}:{line_number}"
            content = raw.rstrip(b"\r\n") if raw.endswith(b"\n") else raw
            if len(content) > max_line_bytes:
                raise TaskDataError(
                    f"{where}: line longer than max_line_bytes={max_line_bytes} bytes "
                    "(task.max_line_bytes); refused before tokenizing"
                )
            try:
                text = content.decode("utf-8-sig" if line_number == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise TaskDataError(
                    f"{where}: not UTF-8: byte 0x{content[e.start]:02x} at byte {e.start + 1} "
                    "of the line"
                ) from None
            yield where, text


def _load(path: Path, verifier: str, max_line_bytes: int) -> list[Problem]:
    problems = []
    for where, line in _lines(path, max_line_bytes):
        if not line.strip():
            continue
        try:
            row: Any = json.loads(line)
        except json.JSONDecodeError as e:
            raise TaskDataError(f"{where}: invalid JSON: {e.msg} (column {e.colno})") from None
        except RecursionError:
            raise TaskDataError(f"{where}: invalid JSON: nested too deeply") from None
        if not isinstance(row, dict):
            raise TaskDataError(f"{where}: expected a JSON object, got {type(row).__name__}")
        for key in ("prompt", "answer"):
            if key not in row:
                raise TaskDataError(f"{where}: missing field {key!r}")
        prompt, answer = row.pop("prompt"), row.pop("answer")
        if not isinstance(prompt, str):
            raise TaskDataError(f"{where}: field 'prompt' must be a string, got {prompt!r:.80}")
        if isinstance(answer, (int, float)) and not isinstance(answer, bool):
            answer = str(answer)
        if not isinstance(answer, str):
            raise TaskDataError(
                f"{where}: field 'answer' must be a string or number, got {answer!r:.80}"
            )
        if verifier == "numeric" and last_number(answer) is None:
            raise TaskDataError(f"{where}: field 'answer' has no number for verifier 'numeric'")
        problems.append(Problem(prompt=prompt, answer=answer, metadata=row))
    if not problems:
        raise TaskDataError(f"{path}: no problems (empty file)")
    return problems


class JsonlTask:
    """A task whose problems are the lines of one or two JSONL files."""

    def __init__(
        self,
        path: str | Path,
        *,
        verifier: str = "exact",
        test_path: str | Path | None = None,
        test_fraction: float = 0.1,
        name: str = "jsonl",
        max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
    ) -> None:
        if verifier not in VERIFIERS:
            raise ValueError(f"unknown verifier {verifier!r}; valid: {', '.join(VERIFIERS)}")
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
        if max_line_bytes < 1:
            raise ValueError(f"max_line_bytes must be >= 1, got {max_line_bytes}")
        self.name = name
        self.verifier = verifier
        self._verify = VERIFIERS[verifier]
        rows = _load(Path(path), verifier, max_line_bytes)
        if test_path is None:
            self._splits = {
                split: [p for p in rows if split_of(p.prompt, test_fraction) == split]
                for split in ("train", "test")
            }
        else:
            self._splits = {
                "train": rows,
                "test": _load(Path(test_path), verifier, max_line_bytes),
            }

    def problems(self, split: str, seed: int, n: int) -> list[Problem]:
        """n problems of `split`: shuffled passes over the split, a fresh shuffle per pass."""
        check_split(split)
        pool = self._splits[split]
        if not pool:
            raise ValueError(f"split {split!r} is empty; raise test_fraction or pass test_path")
        rng = random.Random(f"{self.name}/{split}/{seed}")
        out: list[Problem] = []
        while len(out) < n:
            order = list(pool)
            rng.shuffle(order)
            out.extend(order[: n - len(out)])
        return out

    def score(self, problem: Problem, completion: str) -> float:
        return self._verify(completion, problem.answer)


VERIFIERS: dict[str, Callable[[str, str], float]] = {
    "exact": exact,
    "numeric": numeric,
    "contains": contains,
}
