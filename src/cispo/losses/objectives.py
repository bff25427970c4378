"""Per-token policy objectives: pure functions from [B, T] tensors to a [B, T] loss, not reduced.

Every function returns the loss to *minimise* per token; masking and reduction happen later
(`compose.compute_loss`, `aggregate`). Inputs are expected to be finite: `compute_loss` replaces
masked and non-finite positions before calling these. Only `logprobs` (the current trainer policy)
carries a gradient; anchors are detached here whatever the caller passes.

Left out on purpose: SAPO, VESPO, LUSPO, clip-cov/kl-cov, DPPO (see docs/losses.md).
"""

from __future__ import annotations

import torch
from torch import Tensor

# exp(20) ≈ 4.9e8 is far past any clip bound we use, and exp(±20) stays finite in fp16/bf16
# (fp16 max ≈ 6.5e4 overflows at ~11, so keep fp32 for the ratio). verl, OpenRLHF and miles
# clamp at the same bound. The clamp zeroes the gradient of a ratio beyond it.
MAX_LOG_RATIO = 20.0


def token_log_ratio(logprobs: Tensor, anchor_logprobs: Tensor) -> Tensor:
    """log r_t = clamp(logp_t - sg(anchor_t), ±MAX_LOG_RATIO). Shapes [B, T] -> [B, T]."""
    return torch.clamp(logprobs - anchor_logprobs.detach(), -MAX_LOG_RATIO, MAX_LOG_RATIO)


def sequence_log_ratio(logprobs: Tensor, anchor_logprobs: Tensor, loss_mask: Tensor) -> Tensor:
    """GSPO-token log-ratio: log s_i,t = sg(log s_i) + logp_t - sg(logp_t).

    log s_i = mean over active t of (logp_t - anchor_t): the geometric mean of the token ratios.
    The value is the sequence ratio on every token, the gradient per token is s_i * d logp_t, so
    the loss stays per token. An empty sequence gets log s_i = 0.
    Shapes [B, T] -> [B, T]. Reference: GSPO, arXiv:2507.18071 (GSPO-token).
    """
    diff = torch.where(loss_mask, logprobs.detach() - anchor_logprobs.detach(), 0.0)
    count = loss_mask.sum(dim=-1, keepdim=True).clamp(min=1)
    seq = torch.clamp(diff.sum(dim=-1, keepdim=True) / count, -MAX_LOG_RATIO, MAX_LOG_RATIO)
    return seq + logprobs - logprobs.detach()


def cispo(
    logprobs: Tensor,  # [B, T] trainer policy; the only input with a gradient
    anchor_logprobs: Tensor,  # [B, T] sampler or old logprobs (the ratio's denominator)
    advantages: Tensor,  # [B, T]
    *,
    ratio_min: float = 0.0,  # absolute bounds on r, not offsets from 1 (Tinker's defaults)
    ratio_max: float = 4.0,
) -> Tensor:
    """CISPO, MiniMax-M1 (arXiv:2506.13585).

    loss_t = -sg(clip(r_t, ratio_min, ratio_max)) * A_t * logp_t,  r_t = exp(logp_t - anchor_t)
    d loss_t / d logp_t = -clip(r_t) * A_t: the clip bounds the weight but never zeroes a token's
    gradient, unlike PPO. The loss value depends on logp, so it is not comparable to PPO's.
    """
    weight = torch.exp(token_log_ratio(logprobs, anchor_logprobs)).clamp(ratio_min, ratio_max)
    return -weight.detach() * advantages * logprobs


def clipped_surrogate(
    log_ratio: Tensor,  # [B, T] from token_log_ratio or sequence_log_ratio
    advantages: Tensor,  # [B, T]
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    dual_clip_c: float | None = None,
) -> Tensor:
    """PPO clipped surrogate; GRPO, DAPO clip-higher, dual-clip and GSPO are settings of it.

    loss_t = max(-r_t A_t, -clip(r_t, 1 - eps_low, 1 + eps_high) A_t)
    dual clip (A_t < 0 only): loss_t = min(loss_t, -c A_t)
    References: PPO arXiv:1707.06347; GRPO arXiv:2402.03300 (eps_low = eps_high = 0.2);
    DAPO arXiv:2503.14476 (eps_high = 0.28); dual-clip arXiv:1912.09729 (c = 3);
    GSPO arXiv:2507.18071 (sequence-level log_ratio).
    """
    ratio = torch.exp(log_ratio)
    unclipped = -ratio * advantages
    clipped = -torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * advantages
    loss = torch.maximum(unclipped, clipped)
    if dual_clip_c is not None:
        loss = torch.where(advantages < 0, torch.minimum(loss, -dual_clip_c * advantages), loss)
    return loss


def importance_sampling(
    log_ratio: Tensor,  # [B, T]
    advantages: Tensor,  # [B, T]
    *,
    ratio_min: float = 0.0,
    ratio_max: float = float("inf"),
) -> Tensor:
    """Importance-sampled policy gradient (Tinker `importance_sampling`).

    loss_t = -clamp(r_t, ratio_min, ratio_max) * A_t; the defaults leave r unclamped (Tinker's
    documented form). Where the clamp binds, the token's gradient is 0.
    """
    return -torch.clamp(torch.exp(log_ratio), ratio_min, ratio_max) * advantages


def reinforce(logprobs: Tensor, advantages: Tensor) -> Tensor:
    """REINFORCE (Williams 1992): loss_t = -A_t * logp_t. Shapes [B, T] -> [B, T]."""
    return -advantages * logprobs


def cross_entropy(logprobs: Tensor, weights: Tensor) -> Tensor:
    """Weighted negative log-likelihood for SFT (Tinker `cross_entropy`): -weights_t * logp_t."""
    return -weights * logprobs


def dro(
    logprobs: Tensor,  # [B, T]
    anchor_logprobs: Tensor,  # [B, T] q: sampler (Tinker) or old (verl)
    advantages: Tensor,  # [B, T]
    *,
    beta: float,
) -> Tensor:
    """DRO, Tinker/verl form: loss_t = -(logp_t A_t - beta/2 (logp_t - q_t)^2).

    Reference: Tinker docs `/tinker/losses/dro`; verl `compute_policy_loss` loss_mode="dro".
    """
    return -(logprobs * advantages - 0.5 * beta * (logprobs - anchor_logprobs.detach()) ** 2)
