"""Closed-form per-token values of every objective, and every objective x reduction via
compute_loss, on the 3-active-token fixture in conftest.py (r = 1, 5, 0.5; A = 1, 1, -2;
logp = -1, -0.5, -2)."""

import math

import pytest
import torch

from cispo.losses import (
    LossInputs,
    clipped_surrogate,
    compute_loss,
    make_loss_config,
)
from cispo.losses.objectives import sequence_log_ratio, token_log_ratio

from .conftest import Fixture

LN5, LN2 = math.log(5.0), math.log(2.0)
SQRT5 = math.sqrt(5.0)

# Per-token loss at t1, t2, t3, worked by hand.
PER_TOKEN = {
    # CISPO [0, 4]: w = clip(1, 5, 0.5) = 1, 4, 0.5; ℓ = -w·A·logp
    #   = -(1·1·-1), -(4·1·-0.5), -(0.5·-2·-2) = 1, 2, -2
    "cispo": (1.0, 2.0, -2.0),
    # PPO 0.8/1.2: t1 max(-1, -1) = -1; t2 max(-5·1, -1.2·1) = -1.2;
    #   t3 max(-0.5·-2, -0.8·-2) = max(1, 1.6) = 1.6
    "ppo": (-1.0, -1.2, 1.6),
    # GSPO (3e-4, 4e-4): s_0 = exp(mean(0, ln5)) = √5 ≈ 2.236, s_1 = 0.5.
    #   seq 0, A=1: max(-√5, -1.0004) = -1.0004 on both tokens; seq 1, A=-2:
    #   max(-0.5·-2, -0.9997·-2) = max(1, 1.9994) = 1.9994
    "gspo": (-1.0004, -1.0004, 1.9994),
    # importance_sampling: -r·A = -1, -5, 1
    "importance_sampling": (-1.0, -5.0, 1.0),
    # REINFORCE: -A·logp = 1, 0.5, -4
    "reinforce": (1.0, 0.5, -4.0),
    # cross_entropy, weights 1, 2, 0.5: -w·logp = 1, 1, 1
    "cross_entropy": (1.0, 1.0, 1.0),
    # DRO β=1, q = sampler, logp - q = ln r = 0, ln5, -ln2:
    #   t1 -(-1·1 - 0) = 1; t2 -(-0.5 - ½ln²5) = 0.5 + 1.2951452 = 1.7951452;
    #   t3 -((-2)(-2) - ½ln²2) = -(4 - 0.2402265) = -3.7597735
    "dro": (1.0, 0.5 + 0.5 * LN5**2, -(4.0 - 0.5 * LN2**2)),
}
CONFIGS = {"dro": {"beta": 1.0}}


def by_hand(loss: tuple[float, float, float], reduction: str) -> float:
    l1, l2, l3 = loss
    # Sequence 0 holds t1, t2; sequence 1 holds t3. 3 tokens, 2 sequences, L = 4.
    return {
        "sum": l1 + l2 + l3,
        "token_mean": (l1 + l2 + l3) / 3,
        "seq_mean_token_mean": ((l1 + l2) / 2 + l3) / 2,
        "seq_mean_token_sum": (l1 + l2 + l3) / 2,
        "seq_mean_token_sum_norm": (l1 + l2 + l3) / (2 * 4),
    }[reduction]


def inputs_of(fx: Fixture, **kw: torch.Tensor) -> LossInputs:
    return LossInputs(
        logprobs=kw.get("logprobs", fx.logprobs),
        loss_mask=fx.loss_mask,
        advantages=fx.advantages,
        sampler_logprobs=fx.sampler_logprobs,
        weights=fx.weights,
    )


@pytest.mark.parametrize("loss_fn", sorted(PER_TOKEN))
@pytest.mark.parametrize(
    "reduction",
    ["sum", "token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm"],
)
def test_every_objective_times_reduction_matches_hand_worked_value(
    fx: Fixture, loss_fn: str, reduction: str
) -> None:
    cfg = make_loss_config(loss_fn, CONFIGS.get(loss_fn), reduction=reduction, max_len=4)
    out = compute_loss(inputs_of(fx), cfg)
    expected = by_hand(PER_TOKEN[loss_fn], reduction)
    assert out.loss.item() == pytest.approx(expected, abs=1e-6)


def test_dual_clip_caps_negative_advantage_loss_at_c_times_abs_a() -> None:
    # r = 5, A = -2: max(-5·-2, -1.2·-2) = max(10, 2.4) = 10; dual clip c=3: min(10, 6) = 6.
    log_r = torch.tensor([[math.log(5.0)]])
    a = torch.tensor([[-2.0]])
    assert clipped_surrogate(log_r, a).item() == pytest.approx(10.0)
    assert clipped_surrogate(log_r, a, dual_clip_c=3.0).item() == pytest.approx(6.0)


def test_dapo_clip_higher_lets_ratio_reach_1_28_for_positive_advantage() -> None:
    # r = 1.25, A = 1: GRPO clip 1.2 -> max(-1.25, -1.2) = -1.2; DAPO 1.28 -> -1.25.
    log_r = torch.tensor([[math.log(1.25)]])
    a = torch.ones(1, 1)
    assert clipped_surrogate(log_r, a).item() == pytest.approx(-1.2)
    assert clipped_surrogate(log_r, a, eps_high=0.28).item() == pytest.approx(-1.25)


def test_gspo_token_ratio_value_is_sequence_geometric_mean_and_gradient_per_token(
    fx: Fixture,
) -> None:
    lp = fx.logprobs.clone().requires_grad_(True)
    log_s = sequence_log_ratio(lp, fx.sampler_logprobs, fx.loss_mask)
    # Sequence 0: mean(0, ln5) = ln5/2 on both tokens.
    assert log_s[0, 0].item() == pytest.approx(LN5 / 2)
    assert log_s[0, 1].item() == pytest.approx(LN5 / 2)
    # d Σ exp(log s) / d logp_t = s on each token (GSPO-token): √5 at (0, 0).
    torch.exp(log_s[0]).sum().backward()
    assert lp.grad is not None
    assert lp.grad[0].tolist() == pytest.approx([SQRT5, SQRT5])


def test_token_log_ratio_is_clamped_to_20_before_exp() -> None:
    lr = token_log_ratio(torch.tensor([[0.0, 0.0]]), torch.tensor([[-100.0, 100.0]]))
    assert lr.tolist() == [[20.0, -20.0]]
