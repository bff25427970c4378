"""Reductions: closed forms, NaN at masked positions, empty sequences, gradcheck."""

import pytest
import torch

from cispo.losses import (
    reduce,
    seq_mean_token_mean,
    seq_mean_token_sum,
    seq_mean_token_sum_norm,
    token_mean,
    token_sum,
)

NAN, INF = float("nan"), float("inf")
# Rows: [1, 2 | masked 100], [4 | masked NaN, inf], [all masked] (an empty sequence).
LOSS = torch.tensor([[1.0, 2.0, 100.0], [4.0, NAN, INF], [NAN, 7.0, 7.0]], dtype=torch.float64)
MASK = torch.tensor([[True, True, False], [True, False, False], [False, False, False]])


def test_token_mean_divides_by_active_tokens_and_ignores_nan_at_masked_positions() -> None:
    # (1 + 2 + 4) / 3 = 7/3
    assert token_mean(LOSS, MASK).item() == pytest.approx(7 / 3)


def test_token_mean_uses_given_global_token_count() -> None:
    # 7 / 10
    assert token_mean(LOSS, MASK, num_tokens=10).item() == pytest.approx(0.7)


def test_seq_mean_token_mean_excludes_empty_sequence_from_local_count() -> None:
    # ((1 + 2)/2 + 4/1) / 2 non-empty sequences = 5.5 / 2 = 2.75 (not / 3)
    assert seq_mean_token_mean(LOSS, MASK).item() == pytest.approx(2.75)
    # A caller's count is used as given: 5.5 / 3.
    assert seq_mean_token_mean(LOSS, MASK, num_sequences=3).item() == pytest.approx(5.5 / 3)


def test_seq_mean_token_sum_divides_token_sum_by_nonempty_sequences() -> None:
    # (1 + 2 + 4) / 2 = 3.5
    assert seq_mean_token_sum(LOSS, MASK).item() == pytest.approx(3.5)


def test_seq_mean_token_sum_norm_is_dr_grpo_constant() -> None:
    # 7 / (2 sequences · L=4) = 0.875
    assert seq_mean_token_sum_norm(LOSS, MASK, max_len=4).item() == pytest.approx(0.875)


def test_sum_is_plain_masked_sum() -> None:
    assert token_sum(LOSS, MASK).item() == pytest.approx(7.0)


def test_all_masked_batch_reduces_to_zero_not_nan() -> None:
    empty = torch.zeros_like(MASK)
    for name in ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "sum"]:
        assert reduce(name, LOSS, empty).item() == 0.0


def test_unknown_reduction_names_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="seq_mean_token_mean"):
        reduce("mean", LOSS, MASK)


@pytest.mark.parametrize(
    "name",
    ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm", "sum"],
)
def test_reduction_passes_gradcheck_in_float64(name: str) -> None:
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 0, 1], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    assert torch.autograd.gradcheck(
        lambda t: reduce(name, t, mask, max_len=4, num_tokens=5.0), (x,)
    )


def test_reduction_gradient_is_zero_and_finite_at_masked_nan_positions() -> None:
    x = LOSS.clone().requires_grad_(True)
    token_mean(x, MASK).backward()
    assert x.grad is not None
    # 1/3 on each active token, exactly 0 elsewhere (NaN and inf included).
    expected = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=torch.float64) / 3
    torch.testing.assert_close(x.grad, expected)
