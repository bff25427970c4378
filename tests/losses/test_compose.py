"""compute_loss: gradients, three-policy accounting, invariances and numerical safety."""

import math
from dataclasses import replace
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cispo.losses import (
    CispoConfig,
    CorrectionConfig,
    LossConfig,
    LossInputs,
    ReinforceConfig,
    compute_loss,
    make_loss_config,
)

from .conftest import Fixture


def _grad(inputs: LossInputs, cfg: LossConfig, **kw: float) -> torch.Tensor:
    lp = inputs.logprobs.detach().clone().requires_grad_(True)
    out = compute_loss(replace(inputs, logprobs=lp), cfg, **kw)
    out.loss.backward()
    assert lp.grad is not None
    return lp.grad


def test_cispo_gradient_is_minus_clipped_weight_times_advantage_over_z(fx: Fixture) -> None:
    # w = 1, 4, 0.5; A = 1, 1, -2; Z = 3 tokens: -w·A/Z = -1/3, -4/3, +1/3; masked 0.
    cfg = make_loss_config("cispo", reduction="token_mean")
    inputs = LossInputs(
        logprobs=fx.logprobs,
        loss_mask=fx.loss_mask,
        advantages=fx.advantages,
        sampler_logprobs=fx.sampler_logprobs,
    )
    expected = torch.tensor([[-1 / 3, -4 / 3], [1 / 3, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(_grad(inputs, cfg), expected)


def test_cispo_keeps_gradient_when_ratio_is_clipped_unlike_ppo(fx: Fixture) -> None:
    # t2 has r = 5 > 1.2 with A > 0: PPO zeroes its gradient, CISPO gives -4 (sum reduction).
    inputs = LossInputs(
        logprobs=fx.logprobs,
        loss_mask=fx.loss_mask,
        advantages=fx.advantages,
        sampler_logprobs=fx.sampler_logprobs,
    )
    assert _grad(inputs, make_loss_config("ppo"))[0, 1].item() == 0.0
    assert _grad(inputs, make_loss_config("cispo"))[0, 1].item() == pytest.approx(-4.0)


@pytest.mark.parametrize("anchor", ["old", "sampler"])
def test_no_gradient_reaches_old_or_sampler_logprobs(fx: Fixture, anchor: str) -> None:
    lp = fx.logprobs.clone().requires_grad_(True)
    old = fx.sampler_logprobs.clone().add(0.1).requires_grad_(True)
    sampler = fx.sampler_logprobs.clone().requires_grad_(True)
    corr = {"correction": "tis"} if anchor == "old" else {}
    cfg = make_loss_config("cispo", {"anchor": anchor, **corr}, opsm_delta=0.0)
    out = compute_loss(
        LossInputs(
            logprobs=lp,
            loss_mask=fx.loss_mask,
            advantages=fx.advantages,
            sampler_logprobs=sampler,
            old_logprobs=old,
        ),
        cfg,
    )
    out.loss.backward()
    assert lp.grad is not None and lp.grad.abs().sum().item() > 0
    for t in (old, sampler):
        assert t.grad is None or t.grad.abs().sum().item() == 0.0


@pytest.mark.parametrize("loss_fn", ["cispo", "ppo", "reinforce", "importance_sampling"])
def test_on_policy_gradients_coincide_with_reinforce(loss_fn: str) -> None:
    # r ≡ 1 (sampler = logp): every objective's gradient is -A/Z.
    lp = torch.randn(4, 6, dtype=torch.float64) - 1.0
    mask = torch.rand(4, 6) > 0.3
    adv = torch.randn(4, 1, dtype=torch.float64).expand(4, 6)
    inputs = LossInputs(logprobs=lp, loss_mask=mask, advantages=adv, sampler_logprobs=lp.clone())
    cfg = make_loss_config(loss_fn, reduction="token_mean")
    ref = _grad(inputs, make_loss_config("reinforce", reduction="token_mean"))
    torch.testing.assert_close(_grad(inputs, cfg), ref)
    expected = torch.where(mask, -adv / mask.sum(), 0.0)
    torch.testing.assert_close(ref, expected)


def test_cispo_equals_reinforce_with_truncated_is_weight() -> None:
    # CISPO (sampler anchor, [0, 4]) = REINFORCE × TIS with w = clip(exp(logp - sampler), 0, 4),
    # i.e. old_logprobs = the current logprobs.
    torch.manual_seed(1)
    lp = torch.randn(3, 5, dtype=torch.float64) - 1.0
    sampler = lp + torch.randn(3, 5, dtype=torch.float64)  # ratios spread around the cap
    mask = torch.rand(3, 5) > 0.2
    adv = torch.randn(3, 5, dtype=torch.float64)
    cispo_in = LossInputs(logprobs=lp, loss_mask=mask, advantages=adv, sampler_logprobs=sampler)
    tis_in = LossInputs(
        logprobs=lp,
        loss_mask=mask,
        advantages=adv,
        sampler_logprobs=sampler,
        old_logprobs=lp.clone(),
    )
    cispo_cfg = LossConfig(objective=CispoConfig(), reduction="token_mean")
    tis_cfg = LossConfig(
        objective=ReinforceConfig(),
        reduction="token_mean",
        correction=CorrectionConfig(kind="tis", ratio_min=0.0, ratio_max=4.0),
    )
    torch.testing.assert_close(_grad(cispo_in, cispo_cfg), _grad(tis_in, tis_cfg))


def test_cispo_old_anchor_with_tis_multiplies_both_weights() -> None:
    # logp - old = ln 6 -> CISPO w = 4 (cap); old - sampler = ln 3 -> TIS w = 2 (cap).
    # Sum reduction, A = 1: grad = -4 · 2 · 1 = -8.
    lp = torch.tensor([[-1.0]], dtype=torch.float64)
    old = lp - math.log(6.0)
    sampler = old - math.log(3.0)
    cfg = make_loss_config("cispo", {"anchor": "old", "correction": "tis"})
    inputs = LossInputs(
        logprobs=lp,
        loss_mask=torch.ones(1, 1, dtype=torch.bool),
        advantages=torch.ones(1, 1, dtype=torch.float64),
        sampler_logprobs=sampler,
        old_logprobs=old,
    )
    assert _grad(inputs, cfg).item() == pytest.approx(-8.0)


@pytest.mark.parametrize(
    ("reduction", "count_kw"),
    [
        ("token_mean", "num_tokens"),
        ("seq_mean_token_mean", "num_sequences"),
        ("seq_mean_token_sum_norm", "num_sequences"),
    ],
)
def test_micro_batches_with_global_counts_give_the_one_batch_gradient(
    reduction: str, count_kw: str
) -> None:
    torch.manual_seed(2)
    b, t = 8, 5
    lp = torch.randn(b, t, dtype=torch.float64) - 1.0
    sampler = lp + 0.5 * torch.randn(b, t, dtype=torch.float64)
    mask = torch.rand(b, t) > 0.3
    mask[:, 0] = True  # no empty sequence, so both counts are unambiguous
    adv = torch.randn(b, 1, dtype=torch.float64).expand(b, t)
    cfg = make_loss_config("cispo", reduction=reduction, max_len=t)
    count = float(mask.sum()) if count_kw == "num_tokens" else float(b)

    def grad_over(splits: list[slice]) -> torch.Tensor:
        leaf = lp.clone().requires_grad_(True)
        total = sum(
            compute_loss(
                LossInputs(
                    logprobs=leaf[s],
                    loss_mask=mask[s],
                    advantages=adv[s],
                    sampler_logprobs=sampler[s],
                ),
                cfg,
                **{count_kw: count},
            ).loss
            for s in splits
        )
        assert isinstance(total, torch.Tensor)
        total.backward()
        assert leaf.grad is not None
        return leaf.grad

    one = grad_over([slice(0, 8)])
    torch.testing.assert_close(grad_over([slice(i, i + 1) for i in range(8)]), one)  # 8×1
    torch.testing.assert_close(grad_over([slice(0, 4), slice(4, 8)]), one)  # 2 ranks


def test_neg_inf_target_logprob_at_masked_token_keeps_loss_and_grad_finite() -> None:
    # Regression for miles PR #1331: CISPO multiplies raw logp, so -inf · 0 = NaN with x * mask.
    lp = torch.tensor([[-0.5, float("-inf")]], requires_grad=True)
    inputs = LossInputs(
        logprobs=lp,
        loss_mask=torch.tensor([[True, False]]),
        advantages=torch.ones(1, 2),
        sampler_logprobs=torch.tensor([[-0.5, float("-inf")]]),
    )
    out = compute_loss(inputs, make_loss_config("cispo", reduction="token_mean"))
    out.loss.backward()
    assert lp.grad is not None
    assert math.isfinite(out.loss.item()) and torch.isfinite(lp.grad).all()
    # r = 1 at the active token: loss = -1·1·(-0.5) = 0.5, grad = -1 there, 0 at the masked one.
    assert out.loss.item() == pytest.approx(0.5)
    assert lp.grad.tolist() == [[-1.0, 0.0]]
    assert all(math.isfinite(v) for v in out.metrics.values())


def test_nonfinite_active_token_is_zeroed_and_counted_or_raised(fx: Fixture) -> None:
    lp = fx.logprobs.clone()
    lp[0, 1] = float("nan")  # active t2
    inputs = LossInputs(
        logprobs=lp,
        loss_mask=fx.loss_mask,
        advantages=fx.advantages,
        sampler_logprobs=fx.sampler_logprobs,
    )
    out = compute_loss(inputs, make_loss_config("cispo"))
    # t2 dropped: CISPO sum = 1 + (-2) = -1.
    assert out.loss.item() == pytest.approx(-1.0)
    assert out.metrics["loss/nonfinite_tokens"] == 1.0
    with pytest.raises(ValueError, match=r"non-finite values in \['logprobs'\]"):
        compute_loss(inputs, make_loss_config("cispo", nonfinite="raise"))


@pytest.mark.parametrize(
    ("cfg_kwargs", "missing"),
    [
        ({"loss_fn": "cispo", "loss_fn_config": {"anchor": "old"}}, "old_logprobs"),
        ({"loss_fn": "cispo"}, "sampler_logprobs"),
        ({"loss_fn": "reinforce", "loss_fn_config": {"kl_coef": 0.1}}, "ref_logprobs"),
        ({"loss_fn": "reinforce", "loss_fn_config": {"entropy_coef": 0.1}}, "entropy"),
    ],
)
def test_missing_input_error_names_the_field_and_why(
    cfg_kwargs: dict[str, Any], missing: str
) -> None:
    inputs = LossInputs(
        logprobs=torch.zeros(1, 2),
        loss_mask=torch.ones(1, 2, dtype=torch.bool),
        advantages=torch.ones(1, 2),
    )
    with pytest.raises(ValueError, match=f"LossInputs.{missing} is required by"):
        compute_loss(inputs, make_loss_config(**cfg_kwargs))


def test_float_loss_mask_is_rejected() -> None:
    inputs = LossInputs(
        logprobs=torch.zeros(1, 2), loss_mask=torch.ones(1, 2), advantages=torch.ones(1, 2)
    )
    with pytest.raises(ValueError, match="loss_mask must be bool"):
        compute_loss(inputs, make_loss_config("reinforce"))


def test_kl_and_entropy_terms_add_to_the_per_token_loss() -> None:
    # REINFORCE A=1, logp=-1: 1. k3 with ref=-2: e^-1 ≈ 0.3678794, × 0.5. Entropy 2 × 0.1.
    # Sum: 1 + 0.1839397 - 0.2 = 0.9839397
    inputs = LossInputs(
        logprobs=torch.tensor([[-1.0]]),
        loss_mask=torch.ones(1, 1, dtype=torch.bool),
        advantages=torch.ones(1, 1),
        ref_logprobs=torch.tensor([[-2.0]]),
        entropy=torch.tensor([[2.0]]),
    )
    cfg = make_loss_config("reinforce", kl_coef=0.5, entropy_coef=0.1)
    out = compute_loss(inputs, cfg)
    assert out.loss.item() == pytest.approx(1.0 + 0.5 * math.exp(-1.0) - 0.2, abs=1e-6)
    assert out.metrics["kl/ref_k3"] == pytest.approx(math.exp(-1.0), abs=1e-6)
    assert out.metrics["entropy/mean"] == pytest.approx(2.0)


@settings(max_examples=40, deadline=None)
@given(
    loss_fn=st.sampled_from(
        ["cispo", "ppo", "gspo", "importance_sampling", "reinforce", "cross_entropy", "dro"]
    ),
    reduction=st.sampled_from(["sum", "token_mean", "seq_mean_token_mean"]),
    b=st.integers(1, 4),
    t=st.integers(1, 6),
    seed=st.integers(0, 2**16),
    scale=st.floats(0.1, 50.0),
)
def test_loss_and_gradient_are_finite_with_neg_inf_at_masked_positions(
    loss_fn: str, reduction: str, b: int, t: int, seed: int, scale: float
) -> None:
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(b, t, generator=g) > 0.4
    lp = -scale * torch.rand(b, t, generator=g)
    sampler = -scale * torch.rand(b, t, generator=g)
    lp = torch.where(mask, lp, float("-inf")).requires_grad_(True)
    sampler = torch.where(mask, sampler, float("nan"))
    adv = torch.randn(b, t, generator=g) * scale
    cfg = make_loss_config(
        loss_fn, {"beta": 0.1} if loss_fn == "dro" else None, reduction=reduction, kl_coef=0.1
    )
    out = compute_loss(
        LossInputs(
            logprobs=lp,
            loss_mask=mask,
            advantages=adv,
            sampler_logprobs=sampler,
            ref_logprobs=sampler,
            weights=torch.ones(b, t),
        ),
        cfg,
    )
    out.loss.backward()
    assert lp.grad is not None
    assert math.isfinite(out.loss.item())
    assert torch.isfinite(lp.grad).all()
    assert (lp.grad[~mask] == 0).all()
    assert all(math.isfinite(v) for v in out.metrics.values())
