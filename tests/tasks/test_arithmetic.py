"""ArithmeticTask: prompts, exact verification, determinism, disjoint splits."""

import random

import pytest

from cispo.tasks.arithmetic import ArithmeticTask, evaluate
from cispo.tasks.base import Problem, extract_answer, split_of


def test_default_is_two_term_two_digit_addition_and_subtraction() -> None:
    for p in ArithmeticTask().problems("train", seed=0, n=200):
        a, op, b = p.metadata["operands"][0], p.metadata["operators"][0], p.metadata["operands"][1]
        assert op in "+-" and 0 <= a < 100 and 0 <= b < 100
        assert p.prompt == f"{a}{op}{b}="
        assert p.answer == str(a + b if op == "+" else a - b)


def test_multiplication_binds_tighter() -> None:
    # 2 + 3 * 4 - 5 = 2 + 12 - 5 = 9;  7 * 8 - 6 * 5 = 56 - 30 = 26
    assert evaluate([2, 3, 4, 5], ["+", "*", "-"]) == 9
    assert evaluate([7, 8, 6, 5], ["*", "-", "*"]) == 26
    assert evaluate([3, 4], ["-"]) == -1


def test_evaluate_matches_python_on_random_expressions() -> None:
    rng = random.Random(0)
    for _ in range(500):
        k = rng.randint(2, 5)
        xs = [rng.randrange(100) for _ in range(k)]
        ops = [rng.choice("+-*") for _ in range(k - 1)]
        text = str(xs[0]) + "".join(f"{o}{x}" for o, x in zip(ops, xs[1:], strict=True))
        assert evaluate(xs, ops) == eval(text)  # trusted: generated digits and operators


def test_configured_terms_digits_and_operators() -> None:
    task = ArithmeticTask(num_terms=4, digits=3, operators="*")
    for p in task.problems("test", seed=3, n=50):
        assert len(p.metadata["operands"]) == 4
        assert all(0 <= x < 1000 for x in p.metadata["operands"])
        assert p.prompt.count("*") == 3 and p.prompt.endswith("=")


@pytest.mark.parametrize(
    ("completion", "reward"),
    [
        ("82", 1.0),
        ("82\n", 1.0),
        (" 82 \n37+45=82\n", 1.0),  # only the first line counts
        ("82<|endoftext|>garbage", 1.0),
        ("82</s>", 1.0),
        ("082\n", 0.0),
        ("82.0\n", 0.0),
        ("823\n", 0.0),
        ("8 2\n", 0.0),
        ("\n82", 0.0),  # empty first line
        ("", 0.0),
    ],
)
def test_score_is_exact_on_first_line(completion: str, reward: float) -> None:
    problem = Problem(prompt="37+45=", answer="82")
    assert ArithmeticTask().score(problem, completion) == reward


def test_negative_answers_are_scored_exactly() -> None:
    problem = Problem(prompt="12-45=", answer="-33")
    assert ArithmeticTask().score(problem, "-33\n") == 1.0
    assert ArithmeticTask().score(problem, "33\n") == 0.0


def test_same_seed_same_problems_and_different_seed_differs() -> None:
    task = ArithmeticTask()
    assert task.problems("train", 7, 32) == task.problems("train", 7, 32)
    assert task.problems("train", 7, 32) != task.problems("train", 8, 32)
    # A prefix of a longer draw: n only decides where to stop.
    assert task.problems("train", 7, 40)[:32] == task.problems("train", 7, 32)


def test_train_and_test_prompts_are_disjoint() -> None:
    task = ArithmeticTask()
    train = {p.prompt for s in range(3) for p in task.problems("train", s, 2000)}
    test = {p.prompt for s in range(3) for p in task.problems("test", s, 500)}
    assert not train & test
    assert all(split_of(p, 0.1) == "test" for p in test)
    # The hash split holds about test_fraction of the prompts: with 6000 draws from the
    # 20000-prompt space, the train side should see many distinct prompts, not a handful.
    assert len(train) > 3000 and len(test) > 300


def test_share_of_test_prompts_is_close_to_test_fraction() -> None:
    # All 2 * 100 * 100 two-digit prompts; binomial sd of the share is sqrt(.09/20000) = 0.002.
    prompts = [f"{a}{op}{b}=" for a in range(100) for b in range(100) for op in "+-"]
    share = sum(split_of(p, 0.1) == "test" for p in prompts) / len(prompts)
    assert abs(share - 0.1) < 0.01


def test_rejects_bad_config_and_split() -> None:
    with pytest.raises(ValueError, match="num_terms"):
        ArithmeticTask(num_terms=1)
    with pytest.raises(ValueError, match="operators"):
        ArithmeticTask(operators="+/")
    with pytest.raises(ValueError, match="test_fraction"):
        ArithmeticTask(test_fraction=1.0)
    with pytest.raises(ValueError, match="unknown split 'val'; valid: train, test"):
        ArithmeticTask().problems("val", 0, 1)


def test_too_small_problem_space_raises_instead_of_looping() -> None:
    # digits=1, "*" only, two terms: 100 prompts, about 1 in 1000 lands in test at 0.001.
    task = ArithmeticTask(digits=1, operators="*", test_fraction=0.001)
    prompts = [f"{a}*{b}=" for a in range(10) for b in range(10)]
    if any(split_of(p, 0.001) == "test" for p in prompts):
        pytest.skip("this hash happens to put a prompt in test")
    with pytest.raises(ValueError, match="too small"):
        task.problems("test", 0, 1)


def test_extract_answer_stops_at_first_marker() -> None:
    assert extract_answer("12</s>\n34") == "12"
    assert extract_answer("  7  ") == "7"


def test_instruction_prompt_keeps_problems_and_splits_of_the_bare_task() -> None:
    bare, chat = ArithmeticTask(), ArithmeticTask(instruction=True)
    for split in ("train", "test"):
        for b, c in zip(bare.problems(split, 3, 50), chat.problems(split, 3, 50), strict=True):
            assert c.prompt == f"What is {b.prompt[:-1]}? Answer with the number only."
            assert (c.answer, c.metadata) == (b.answer, b.metadata)


@pytest.mark.parametrize(
    ("completion", "reward"),
    [
        ("82", 1.0),
        ("37 + 45 = 82", 1.0),
        ("The answer is 82.\n37", 1.0),  # only the first line counts
        ("37+45=82<|im_end|>", 1.0),
        ("82 is wrong, it is 83", 0.0),  # the last integer is the answer
        ("823", 0.0),
        ("The answer is", 0.0),
        ("", 0.0),
    ],
)
def test_instruction_score_reads_last_integer_of_first_line(completion: str, reward: float) -> None:
    problem = Problem(prompt="What is 37+45? Answer with the number only.", answer="82")
    assert ArithmeticTask(instruction=True).score(problem, completion) == reward


def test_instruction_score_reads_negative_answers() -> None:
    problem = Problem(prompt="What is 12-45? Answer with the number only.", answer="-33")
    assert ArithmeticTask(instruction=True).score(problem, "12 - 45 = -33") == 1.0
    assert ArithmeticTask(instruction=True).score(problem, "33") == 0.0
