"""Train-vs-sampler corrections: TIS, MIS, the named sequence statistic, OPSM."""

import math

import pytest
import torch

from cispo.losses.corrections import correction_weight, opsm_keep_mask

LN2, LN3 = math.log(2.0), math.log(3.0)


def _w(old: list[list[float]], kind: str, level: str, stat: str, hi: float) -> list[float]:
    old_t = torch.tensor(old, dtype=torch.float64)
    sampler = torch.zeros_like(old_t)
    mask = torch.ones_like(old_t, dtype=torch.bool)
    w = correction_weight(
        old_t,
        sampler,
        mask,
        kind=kind,
        level=level,
        sequence_statistic=stat,
        ratio_min=0.0,
        ratio_max=hi,
    )
    return w.flatten().tolist()


def test_token_tis_truncates_and_mis_zeroes_weights_above_the_cap() -> None:
    # exp(old - sampler) = 3, 0.25 with cap 2: TIS -> 2, 0.25; MIS -> 0, 0.25.
    old = [[LN3, math.log(0.25)]]
    assert _w(old, "tis", "token", "product", 2.0) == pytest.approx([2.0, 0.25])
    assert _w(old, "mis", "token", "product", 2.0) == pytest.approx([0.0, 0.25])


def test_sequence_statistic_product_vs_geometric_mean_differ_as_named() -> None:
    # δ = ln2, ln2. product: exp(2 ln2) = 4; geometric mean: exp(ln2) = 2. Cap 3.
    old = [[LN2, LN2]]
    assert _w(old, "tis", "sequence", "product", 3.0) == pytest.approx([3.0, 3.0])
    assert _w(old, "mis", "sequence", "product", 3.0) == pytest.approx([0.0, 0.0])
    assert _w(old, "tis", "sequence", "geometric_mean", 3.0) == pytest.approx([2.0, 2.0])
    assert _w(old, "mis", "sequence", "geometric_mean", 3.0) == pytest.approx([2.0, 2.0])


def test_correction_weight_carries_no_gradient() -> None:
    old = torch.tensor([[0.1, -0.2]], requires_grad=True)
    sampler = torch.tensor([[0.0, 0.0]], requires_grad=True)
    w = correction_weight(
        old,
        sampler,
        torch.ones(1, 2, dtype=torch.bool),
        kind="tis",
        level="token",
        sequence_statistic="product",
        ratio_min=0.0,
        ratio_max=2.0,
    )
    assert not w.requires_grad


def test_opsm_drops_only_negative_advantage_sequences_past_delta() -> None:
    # sampler - logp per sequence: 0.5, 0.5, 0.05; A: -1, +1, -1; δ = 0.1.
    # Drop iff A < 0 and mean > δ: only sequence 0.
    logp = torch.zeros(3, 2)
    sampler = torch.tensor([[0.5, 0.5], [0.5, 0.5], [0.05, 0.05]])
    adv = torch.tensor([[-1.0, -1.0], [1.0, 1.0], [-1.0, -1.0]])
    keep = opsm_keep_mask(logp, sampler, adv, torch.ones(3, 2, dtype=torch.bool), delta=0.1)
    assert keep.tolist() == [[False, False], [True, True], [True, True]]


def test_opsm_mean_ignores_masked_tokens() -> None:
    # Active token diff 0.05 (≤ δ); the masked token's 9.0 must not count.
    keep = opsm_keep_mask(
        torch.zeros(1, 2),
        torch.tensor([[0.05, 9.0]]),
        -torch.ones(1, 2),
        torch.tensor([[True, False]]),
        delta=0.1,
    )
    assert keep.tolist() == [[True, True]]
