"""Train-vs-sampler corrections: truncated IS, masked IS (IcePop) and off-policy sequence masking.

The inference engine (sampler) and the trainer compute slightly different probabilities for the
same policy. With δ_t = old_t - sampler_t (trainer recompute minus sampler, log space) the
correction weight is w = exp(δ), detached, and multiplies the per-token loss. It only makes sense
when the objective's own ratio is anchored on old_logprobs; with a sampler anchor the ratio
already contains exp(δ) and `LossConfig` refuses the combination.

Sequence-level weights use a named statistic: "product" exp(Σ_t δ_t) (TRL, verl, SkyRL) or
"geometric_mean" exp(mean_t δ_t) (ms-swift, NeMo-RL seq-mask-tis). Systems disagree under the
same mode name; see docs/losses.md.
"""

from __future__ import annotations

import torch
from torch import Tensor

from cispo.losses.objectives import MAX_LOG_RATIO


def token_log_weight(old_logprobs: Tensor, sampler_logprobs: Tensor) -> Tensor:
    """δ_t = clamp(old_t - sampler_t, ±MAX_LOG_RATIO), detached. Shapes [B, T] -> [B, T]."""
    delta = (old_logprobs - sampler_logprobs).detach()
    return torch.clamp(delta, -MAX_LOG_RATIO, MAX_LOG_RATIO)


def sequence_log_weight(log_weight: Tensor, loss_mask: Tensor, *, statistic: str) -> Tensor:
    """Per-sequence log weight broadcast over T: Σ_t δ_t ("product") or mean_t δ_t
    ("geometric_mean"), over active tokens; 0 for an empty sequence. [B, T] -> [B, T]."""
    total = torch.where(loss_mask, log_weight, 0.0).sum(dim=-1, keepdim=True)
    if statistic == "product":
        seq = total
    elif statistic == "geometric_mean":
        seq = total / loss_mask.sum(dim=-1, keepdim=True).clamp(min=1)
    else:
        raise ValueError(f"statistic={statistic!r} is not one of ['product', 'geometric_mean']")
    seq = torch.clamp(seq, -MAX_LOG_RATIO, MAX_LOG_RATIO)
    return seq.expand_as(log_weight)


def truncated_is_weight(log_weight: Tensor, *, ratio_min: float, ratio_max: float) -> Tensor:
    """TIS: w = clamp(exp(δ), ratio_min, ratio_max), detached.

    Reference: Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy RL
    training" (blog).
    """
    return torch.exp(log_weight).clamp(ratio_min, ratio_max).detach()


def masked_is_weight(log_weight: Tensor, *, ratio_min: float, ratio_max: float) -> Tensor:
    """MIS / IcePop: w = exp(δ) if ratio_min <= exp(δ) <= ratio_max else 0, detached.

    Reference: IcePop, Ring-1T (arXiv:2510.18855).
    """
    weight = torch.exp(log_weight)
    inside = (weight >= ratio_min) & (weight <= ratio_max)
    return torch.where(inside, weight, 0.0).detach()


def correction_weight(
    old_logprobs: Tensor,  # [B, T] trainer recompute before this round of updates
    sampler_logprobs: Tensor,  # [B, T] the policy that generated the tokens
    loss_mask: Tensor,  # [B, T] bool
    *,
    kind: str,  # "tis" | "mis"
    level: str,  # "token" | "sequence"
    sequence_statistic: str,  # "product" | "geometric_mean"; read only at sequence level
    ratio_min: float,
    ratio_max: float,
) -> Tensor:
    """The detached [B, T] weight multiplied into the per-token loss."""
    log_weight = token_log_weight(old_logprobs, sampler_logprobs)
    if level == "sequence":
        log_weight = sequence_log_weight(log_weight, loss_mask, statistic=sequence_statistic)
    if kind == "tis":
        return truncated_is_weight(log_weight, ratio_min=ratio_min, ratio_max=ratio_max)
    return masked_is_weight(log_weight, ratio_min=ratio_min, ratio_max=ratio_max)


def opsm_keep_mask(
    logprobs: Tensor,  # [B, T] current trainer policy (read detached)
    sampler_logprobs: Tensor,  # [B, T]
    advantages: Tensor,  # [B, T]
    loss_mask: Tensor,  # [B, T] bool
    *,
    delta: float,
) -> Tensor:
    """Off-policy sequence masking (DeepSeek-V3.2, arXiv:2512.02556). Returns keep [B, T] bool.

    A sequence is dropped iff A < 0 and mean_t(sampler_t - logp_t) > delta over its active
    tokens: a negative sample the current policy has already drifted away from. Dropped tokens
    still count in token_mean's normaliser, as in TRL/slime which multiply the loss by the mask.
    """
    diff = torch.where(loss_mask, sampler_logprobs - logprobs.detach(), 0.0)
    kl = diff.sum(dim=-1, keepdim=True) / loss_mask.sum(dim=-1, keepdim=True).clamp(min=1)
    return ~((advantages < 0) & (kl > delta))
