"""JsonlTask: loading, error messages, verifiers, splits."""

import json
import tracemalloc
from collections.abc import Sequence
from pathlib import Path

import pytest

from cispo.tasks.base import Problem, TaskDataError
from cispo.tasks.jsonl import (
    DEFAULT_MAX_LINE_BYTES,
    JsonlTask,
    contains,
    exact,
    last_number,
    numeric,
)


def write(path: Path, rows: Sequence[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_loads_prompt_answer_and_extra_fields_as_metadata(tmp_path: Path) -> None:
    f = write(tmp_path / "a.jsonl", [{"prompt": "1+1=", "answer": 2, "id": "q1", "level": 3}])
    task = JsonlTask(f, test_path=f)
    (p,) = task.problems("train", 0, 1)
    assert p == Problem(prompt="1+1=", answer="2", metadata={"id": "q1", "level": 3})


def test_missing_field_error_names_line_and_field(tmp_path: Path) -> None:
    f = tmp_path / "bad.jsonl"
    f.write_text('{"prompt": "a", "answer": "b"}\n\n{"prompt": "c"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: missing field 'answer'"):
        JsonlTask(f)


def test_invalid_json_error_names_line(tmp_path: Path) -> None:
    f = tmp_path / "bad.jsonl"
    f.write_text('{"prompt": "a", "answer": "b"}\n{"prompt": "c", answer}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: invalid JSON"):
        JsonlTask(f)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ([1, 2], r":1: expected a JSON object, got list"),
        ({"prompt": 5, "answer": "x"}, r":1: field 'prompt' must be a string"),
        ({"prompt": "p", "answer": None}, r":1: field 'answer' must be a string or number"),
        ({"prompt": "p", "answer": True}, r":1: field 'answer' must be a string or number"),
    ],
)
def test_wrong_types_name_line_and_field(tmp_path: Path, row: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        JsonlTask(write(tmp_path / "bad.jsonl", [row]))


def test_numeric_verifier_checks_answers_at_load(tmp_path: Path) -> None:
    f = write(tmp_path / "a.jsonl", [{"prompt": "p", "answer": "forty"}])
    with pytest.raises(ValueError, match=r":1: field 'answer' has no number"):
        JsonlTask(f, verifier="numeric")
    JsonlTask(f, verifier="exact")  # fine for a text answer


def test_empty_file_and_unknown_verifier(tmp_path: Path) -> None:
    f = tmp_path / "empty.jsonl"
    f.write_text("\n")
    with pytest.raises(ValueError, match="no problems"):
        JsonlTask(f)
    g = write(tmp_path / "a.jsonl", [{"prompt": "p", "answer": "a"}])
    with pytest.raises(
        ValueError, match="unknown verifier 'fuzzy'; valid: exact, numeric, contains"
    ):
        JsonlTask(g, verifier="fuzzy")


@pytest.mark.parametrize(
    ("completion", "answer", "reward"),
    [
        (" Paris \nmore text", "Paris", 1.0),
        ("paris", "Paris", 0.0),
        ("Paris.", "Paris", 0.0),
    ],
)
def test_exact(completion: str, answer: str, reward: float) -> None:
    assert exact(completion, answer) == reward


@pytest.mark.parametrize(
    ("completion", "answer", "reward"),
    [
        ("so 3 + 4 = 7", "7", 1.0),  # last number wins
        ("the answer is 1,234.", "1234", 1.0),  # thousands comma, trailing period
        ("x = 0.3333334", "0.3333333", 1.0),  # |diff| 1e-7 < rel_tol 1e-6 * 0.333
        ("x = 0.334", "0.3333333", 0.0),
        ("-12\n", "-12", 1.0),
        ("12", "-12", 0.0),
        ("2.5e3", "2500", 1.0),
        ("7<|endoftext|>then 9", "7", 1.0),  # nothing after EOS counts
        ("no number", "7", 0.0),
    ],
)
def test_numeric(completion: str, answer: str, reward: float) -> None:
    assert numeric(completion, answer) == reward


def test_last_number_reads_separate_numbers_around_a_short_comma_group() -> None:
    assert last_number("3,4") == 4.0
    assert last_number("1,000,000 and then") == 1_000_000.0
    assert last_number("none") is None


def test_contains() -> None:
    assert contains("I think it is Paris, France", " Paris ") == 1.0
    assert contains("I think it is Rome</s>Paris", "Paris") == 0.0


def test_score_uses_the_chosen_verifier(tmp_path: Path) -> None:
    f = write(tmp_path / "a.jsonl", [{"prompt": "p", "answer": "42"}])
    p = JsonlTask(f, test_path=f).problems("train", 0, 1)[0]
    assert JsonlTask(f, verifier="numeric", test_path=f).score(p, "it is 42.0") == 1.0
    assert JsonlTask(f, verifier="exact", test_path=f).score(p, "it is 42.0") == 0.0
    assert JsonlTask(f, verifier="contains", test_path=f).score(p, "it is 42.0") == 1.0


def test_hash_split_is_disjoint_and_complete(tmp_path: Path) -> None:
    rows = [{"prompt": f"q{i}", "answer": str(i)} for i in range(300)]
    task = JsonlTask(write(tmp_path / "a.jsonl", rows), test_fraction=0.2)
    train = {p.prompt for p in task.problems("train", 0, 1000)}
    test = {p.prompt for p in task.problems("test", 0, 1000)}
    assert not train & test
    assert len(train) + len(test) == 300  # 1000 draws cycle through every prompt
    assert 30 < len(test) < 90  # about 0.2 * 300 = 60


def test_problems_are_deterministic_shuffled_passes(tmp_path: Path) -> None:
    rows = [{"prompt": f"q{i}", "answer": str(i)} for i in range(10)]
    f = write(tmp_path / "a.jsonl", rows)
    task = JsonlTask(f, test_path=f)
    first = task.problems("train", 5, 25)
    assert first == task.problems("train", 5, 25)
    # Each full pass of 10 is a permutation of the file.
    assert sorted(p.prompt for p in first[:10]) == sorted(r["prompt"] for r in rows)
    assert sorted(p.prompt for p in first[10:20]) == sorted(r["prompt"] for r in rows)
    assert [p.prompt for p in first] != [p.prompt for p in task.problems("train", 6, 25)]


def test_separate_test_file(tmp_path: Path) -> None:
    train = write(tmp_path / "train.jsonl", [{"prompt": "a", "answer": "1"}])
    test = write(tmp_path / "test.jsonl", [{"prompt": "b", "answer": "2"}])
    task = JsonlTask(train, test_path=test)
    assert [p.prompt for p in task.problems("train", 0, 3)] == ["a", "a", "a"]
    assert [p.prompt for p in task.problems("test", 0, 2)] == ["b", "b"]


def test_non_utf8_bytes_name_the_line_and_the_byte(tmp_path: Path) -> None:
    f = tmp_path / "bad.jsonl"
    f.write_bytes(b'{"prompt": "a", "answer": "b"}\n{"prompt": "caf\xe9", "answer": "c"}\n')
    with pytest.raises(TaskDataError, match=r"bad\.jsonl:2: not UTF-8: byte 0xe9 at byte 16 "):
        JsonlTask(f)


def test_a_utf8_byte_order_mark_is_accepted(tmp_path: Path) -> None:
    f = tmp_path / "bom.jsonl"
    f.write_bytes(b'\xef\xbb\xbf{"prompt": "p", "answer": "a"}\n')
    assert JsonlTask(f, test_path=f).problems("train", 0, 1)[0].prompt == "p"


@pytest.mark.parametrize("newline", [b"\n", b"\r\n", b""])
def test_max_line_bytes_is_the_longest_accepted_line(tmp_path: Path, newline: bytes) -> None:
    line = b'{"prompt": "' + b"x" * 40 + b'", "answer": "a"}'
    f = tmp_path / "a.jsonl"
    f.write_bytes(b'{"prompt": "p", "answer": "a"}\n' + line + newline)
    JsonlTask(f, test_path=f, max_line_bytes=len(line))  # exactly the limit: accepted
    with pytest.raises(TaskDataError, match=r"a\.jsonl:2: line longer than max_line_bytes=64 "):
        JsonlTask(f, max_line_bytes=64)


def test_a_huge_line_is_refused_without_reading_it_into_memory(tmp_path: Path) -> None:
    f = tmp_path / "huge.jsonl"
    size = 32 << 20  # 32 MiB in one line
    with f.open("wb") as out:
        out.write(b'{"prompt": "')
        out.write(b"x" * size)
        out.write(b'", "answer": "a"}\n')
    tracemalloc.start()
    try:
        with pytest.raises(TaskDataError, match=r"huge\.jsonl:1: line longer than max_line_byte"):
            JsonlTask(f)  # the default limit
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert DEFAULT_MAX_LINE_BYTES == 1 << 20
    assert peak < 3 * DEFAULT_MAX_LINE_BYTES, peak  # read at most the limit, not 32 MiB


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"[" * 100_000 + b"]" * 100_000 + b"\n", r":1: invalid JSON: nested too deeply"),
        (b'{"prompt": "a", "answer": "b"}\n{"prompt": \n', r":2: invalid JSON: Expecting value"),
    ],
)
def test_malformed_json_names_the_line(tmp_path: Path, content: bytes, message: str) -> None:
    f = tmp_path / "bad.jsonl"
    f.write_bytes(content)
    with pytest.raises(TaskDataError, match=message):
        JsonlTask(f)


def test_a_missing_file_is_a_task_data_error(tmp_path: Path) -> None:
    with pytest.raises(TaskDataError, match=r"missing\.jsonl: cannot read the JSONL file"):
        JsonlTask(tmp_path / "missing.jsonl")
