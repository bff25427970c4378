"""KL estimators and the entropy bonus."""

import math

import pytest
import torch

from cispo.losses.regularizers import entropy_bonus, kl_penalty


@pytest.mark.parametrize(
    ("estimator", "value", "grad"),
    [
        # logp = -1, ref = -2, d = ref - logp = -1.
        ("k1", 1.0, 1.0),  # k1 = -d = logp - ref = 1; d/dlogp = 1
        ("k2", 0.5, 1.0),  # k2 = d²/2 = 0.5; d/dlogp = -d = 1
        # k3 = e^-1 + 1 - 1 = 0.3678794; d/dlogp = 1 - e^d = 0.6321206
        ("k3", math.exp(-1.0), 1.0 - math.exp(-1.0)),
    ],
)
def test_kl_estimator_value_and_gradient(estimator: str, value: float, grad: float) -> None:
    lp = torch.tensor([[-1.0]], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([[-2.0]], dtype=torch.float64, requires_grad=True)
    kl = kl_penalty(lp, ref, estimator=estimator)
    kl.sum().backward()
    assert kl.item() == pytest.approx(value)
    assert lp.grad is not None and lp.grad.item() == pytest.approx(grad)
    assert ref.grad is None


def test_k3_is_zero_when_policy_equals_reference() -> None:
    lp = torch.tensor([[-0.3, -4.0]])
    assert kl_penalty(lp, lp.clone(), estimator="k3").abs().max().item() < 1e-7


def test_entropy_bonus_lowers_loss_by_coef_times_entropy() -> None:
    # -0.01 · 2.0 = -0.02
    assert entropy_bonus(torch.tensor([[2.0]]), coef=0.01).item() == pytest.approx(-0.02)
