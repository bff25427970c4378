"""Optional per-token regularisers: KL to a reference policy and an entropy bonus.

Both are added to the per-token loss after the objective and any correction weight (TRL's order:
the KL term is not importance-weighted), then reduced with it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from cispo.losses.objectives import MAX_LOG_RATIO


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, *, estimator: str = "k3") -> Tensor:
    """Per-token estimate of KL(π_θ || π_ref) from samples of π_θ. Shapes [B, T] -> [B, T].

    With d_t = ref_t - logp_t (clamped to ±MAX_LOG_RATIO):
      k1 = -d_t               (unbiased, high variance, can be negative)
      k2 = d_t^2 / 2          (biased, low variance)
      k3 = exp(d_t) - d_t - 1 (unbiased, >= 0; GRPO arXiv:2402.03300 eq. 4)
    Reference: J. Schulman, "Approximating KL divergence" (blog, 2020).
    """
    d = torch.clamp(ref_logprobs.detach() - logprobs, -MAX_LOG_RATIO, MAX_LOG_RATIO)
    if estimator == "k1":
        return -d
    if estimator == "k2":
        return 0.5 * d**2
    if estimator == "k3":
        return torch.exp(d) - d - 1.0
    raise ValueError(f"estimator={estimator!r} is not one of ['k1', 'k2', 'k3']")


def entropy_bonus(entropy: Tensor, *, coef: float) -> Tensor:
    """loss_t = -coef * H_t: minimising it raises entropy. `entropy` [B, T] from the caller."""
    return -coef * entropy
