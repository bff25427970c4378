"""Loss diagnostics: detached Python floats named "namespace/name", over active tokens only.

An empty mask gives 0.0 for every statistic (never NaN), so metrics can be averaged safely.
All functions run under no_grad and read their inputs after compose has cleaned them.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from cispo.losses.objectives import MAX_LOG_RATIO


def _mean(x: Tensor, mask: Tensor) -> float:
    n = int(mask.sum().item())
    return float(torch.where(mask, x, 0.0).sum().item()) / n if n else 0.0


def _min(x: Tensor, mask: Tensor) -> float:
    return float(x[mask].min().item()) if bool(mask.any()) else 0.0


def _max(x: Tensor, mask: Tensor) -> float:
    return float(x[mask].max().item()) if bool(mask.any()) else 0.0


def _frac(flag: Tensor, mask: Tensor) -> float:
    return _mean(flag.to(torch.float64), mask)


@torch.no_grad()
def cispo_metrics(
    log_ratio: Tensor, loss_mask: Tensor, *, ratio_min: float, ratio_max: float
) -> dict[str, float]:
    """CISPO weight statistics and the fraction of tokens whose weight the band changed."""
    ratio = torch.exp(log_ratio.detach())
    weight = ratio.clamp(ratio_min, ratio_max)
    capped, floored = ratio > ratio_max, ratio < ratio_min
    return {
        "cispo/weight_mean": _mean(weight, loss_mask),
        "cispo/weight_min": _min(weight, loss_mask),
        "cispo/weight_max": _max(weight, loss_mask),
        "cispo/frac_capped_above": _frac(capped, loss_mask),
        "cispo/frac_floored_below": _frac(floored, loss_mask),
        "cispo/frac_outside_band": _frac(capped | floored, loss_mask),
    }


@torch.no_grad()
def ppo_clip_metrics(
    log_ratio: Tensor,
    advantages: Tensor,
    loss_mask: Tensor,
    *,
    eps_low: float,
    eps_high: float,
    dual_clip_c: float | None,
) -> dict[str, float]:
    """Fraction of tokens where a clip *binds* (zeroes the gradient), A-sign-aware (TRL #3175).

    low: r < 1 - eps_low and A < 0; high: r > 1 + eps_high and A > 0; region: either;
    dual: r > c and A < 0 (only with dual clip).
    """
    ratio = torch.exp(log_ratio.detach())
    low = (ratio < 1.0 - eps_low) & (advantages < 0)
    high = (ratio > 1.0 + eps_high) & (advantages > 0)
    out = {
        "ppo/clip_frac_low": _frac(low, loss_mask),
        "ppo/clip_frac_high": _frac(high, loss_mask),
        "ppo/clip_frac_region": _frac(low | high, loss_mask),
        "ppo/ratio_mean": _mean(ratio, loss_mask),
    }
    if dual_clip_c is not None:
        out["ppo/dual_clip_frac"] = _frac((ratio > dual_clip_c) & (advantages < 0), loss_mask)
    return out


@torch.no_grad()
def mismatch_metrics(
    trainer_logprobs: Tensor, sampler_logprobs: Tensor, loss_mask: Tensor
) -> dict[str, float]:
    """Sampler-vs-trainer divergence, estimating KL(sampler || trainer) from sampled tokens.

    With d_t = trainer_t - sampler_t: k1 = mean(-d), k3 = mean(exp(d) - d - 1) (Schulman's
    estimators), and the ratio exp(d) mean/min/max.
    """
    d = (trainer_logprobs - sampler_logprobs).detach().clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    ratio = torch.exp(d)
    return {
        "mismatch/kl_k1": _mean(-d, loss_mask),
        "mismatch/kl_k3": _mean(ratio - d - 1.0, loss_mask),
        "mismatch/ratio_mean": _mean(ratio, loss_mask),
        "mismatch/ratio_min": _min(ratio, loss_mask),
        "mismatch/ratio_max": _max(ratio, loss_mask),
    }


@torch.no_grad()
def fork_token_metrics(
    grad_coef: Tensor, sampler_logprobs: Tensor, loss_mask: Tensor, *, threshold: float
) -> dict[str, float]:
    """Share of the gradient carried by low-probability ("fork") tokens, without autograd.

    grad_coef_t = d loss_t / d logp_t before normalisation (for CISPO -w_t A_t; the normaliser Z
    cancels in the share). share = Σ_{fork} g_t^2 / Σ g_t^2, the fork tokens' share of the squared
    gradient norm w.r.t. the token logprobs, where fork = sampler probability < threshold
    (the MiniMax-M1 "However / Recheck" tokens, arXiv:2506.13585 §3.1).
    """
    fork = loss_mask & (sampler_logprobs.detach() < math.log(threshold))
    sq = torch.where(loss_mask, grad_coef.detach().to(torch.float64) ** 2, 0.0)
    total = float(sq.sum().item())
    share = float(torch.where(fork, sq, 0.0).sum().item()) / total if total > 0 else 0.0
    return {"fork/grad_share": share, "fork/token_frac": _frac(fork, loss_mask)}


@torch.no_grad()
def mean_metric(name: str, x: Tensor, loss_mask: Tensor) -> dict[str, float]:
    """{name: mean of x over active tokens}."""
    return {name: _mean(x.detach(), loss_mask)}
