"""Metrics through compute_loss on the conftest fixture (r = 1, 5, 0.5; A = 1, 1, -2)."""

import math

import pytest
import torch

from cispo.losses import LossInputs, compute_loss, make_loss_config

from .conftest import Fixture

LN5, LN2 = math.log(5.0), math.log(2.0)


def _metrics(fx: Fixture, loss_fn: str, **cfg: object) -> dict[str, float]:
    inputs = LossInputs(
        logprobs=fx.logprobs,
        loss_mask=fx.loss_mask,
        advantages=fx.advantages,
        sampler_logprobs=fx.sampler_logprobs,
    )
    return compute_loss(inputs, make_loss_config(loss_fn, cfg)).metrics


def test_cispo_weight_stats_and_band_fractions(fx: Fixture) -> None:
    m = _metrics(fx, "cispo", clip_low_threshold=0.8)
    # band [0.8, 4]: w = 1, 4, 0.8 -> mean 5.8/3; capped: r=5 (1/3); floored: r=0.5 (1/3).
    assert m["cispo/weight_mean"] == pytest.approx(5.8 / 3)
    assert (m["cispo/weight_min"], m["cispo/weight_max"]) == pytest.approx((0.8, 4.0))
    assert m["cispo/frac_capped_above"] == pytest.approx(1 / 3)
    assert m["cispo/frac_floored_below"] == pytest.approx(1 / 3)
    assert m["cispo/frac_outside_band"] == pytest.approx(2 / 3)


def test_ppo_clip_fractions_are_advantage_sign_aware(fx: Fixture) -> None:
    m = _metrics(fx, "ppo")
    # high: r=5 > 1.2 with A>0 (t2); low: r=0.5 < 0.8 with A<0 (t3).
    assert m["ppo/clip_frac_high"] == pytest.approx(1 / 3)
    assert m["ppo/clip_frac_low"] == pytest.approx(1 / 3)
    assert m["ppo/clip_frac_region"] == pytest.approx(2 / 3)
    flipped = Fixture(fx.logprobs, fx.sampler_logprobs, -fx.advantages, fx.loss_mask, fx.weights)
    # Same ratios, opposite signs: no clip binds.
    assert _metrics(flipped, "ppo")["ppo/clip_frac_region"] == 0.0


def test_sampler_trainer_mismatch_kl_and_ratio(fx: Fixture) -> None:
    m = _metrics(fx, "reinforce")
    # d = logp - sampler = 0, ln5, -ln2. k1 = mean(-d) = -(ln5 - ln2)/3 = -0.3054302
    assert m["mismatch/kl_k1"] == pytest.approx(-(LN5 - LN2) / 3)
    # k3 = mean(e^d - d - 1) = (0 + (5 - ln5 - 1) + (0.5 + ln2 - 1)) / 3 = 0.8612364
    assert m["mismatch/kl_k3"] == pytest.approx((4 - LN5 + LN2 - 0.5) / 3)
    assert (m["mismatch/ratio_min"], m["mismatch/ratio_max"]) == pytest.approx((0.5, 5.0))


def test_fork_token_share_of_cispo_gradient(fx: Fixture) -> None:
    # Sampler probs: e^-1 = 0.368, e^-0.5/5 = 0.121, 2e^-2 = 0.271; below 0.2: t2 only.
    # CISPO g = -w·A = -1, -4, 1; share = 16 / (1 + 16 + 1) = 0.8889.
    m = _metrics(fx, "cispo", fork_prob_threshold=0.2)
    assert m["fork/grad_share"] == pytest.approx(16 / 18)
    assert m["fork/token_frac"] == pytest.approx(1 / 3)


def test_metric_names_are_namespaced_floats(fx: Fixture) -> None:
    m = _metrics(fx, "cispo")
    assert all("/" in k and isinstance(v, float) for k, v in m.items())
    assert m["loss/active_tokens"] == 3.0


@pytest.mark.parametrize(
    "loss_fn", ["cispo", "ppo", "gspo", "importance_sampling", "reinforce", "dro"]
)
def test_fork_share_from_analytic_gradient_matches_autograd(loss_fn: str) -> None:
    torch.manual_seed(3)
    lp = (torch.randn(3, 6, dtype=torch.float64) - 2.0).requires_grad_(True)
    sampler = lp.detach() + 0.7 * torch.randn(3, 6, dtype=torch.float64)
    mask = torch.rand(3, 6) > 0.2
    adv = torch.randn(3, 6, dtype=torch.float64)
    cfg = make_loss_config(
        loss_fn, {"beta": 0.3} if loss_fn == "dro" else None, fork_prob_threshold=0.15
    )
    out = compute_loss(
        LossInputs(logprobs=lp, loss_mask=mask, advantages=adv, sampler_logprobs=sampler), cfg
    )
    out.loss.backward()
    assert lp.grad is not None
    sq = lp.grad.pow(2)
    fork = mask & (sampler < math.log(0.15))
    assert fork.any() and (mask & ~fork).any()  # the fixture exercises both sides
    expected = (sq[fork].sum() / sq[mask].sum()).item()
    assert out.metrics["fork/grad_share"] == pytest.approx(expected, rel=1e-9)
