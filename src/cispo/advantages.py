"""Advantage estimators: rewards [P, G] -> advantages [P, G] (pure tensor maths).

P prompts, G samples per prompt. Every estimator here assigns one advantage per completion
(outcome rewards); the loss broadcasts it over the completion's tokens.

Conventions shared by all estimators:
- NaN rewards mean "no verdict" (a reward function raised or timed out, see `cispo.rewards`).
  They are left out of every statistic (means, stds, leave-one-out baselines) and their
  advantage is exactly 0, so those completions add nothing to the gradient.
- A group with constant (non-NaN) rewards carries no signal. The group-baseline estimators give
  it exactly 0, not the rounding noise of `r - mean(r)` divided by a tiny std.
- Statistics are computed in float64; the result has the dtype of `rewards`.
- The output never contains NaN or inf.

Deliberately left out: token-level returns with a KL term in the reward (REINFORCE++'s full
form), GAE and value functions, and batch-level std for GRPO (TRL's `scale_rewards="batch"`).
REINFORCE++ here whitens one value per completion; OpenRLHF and verl whiten over tokens, so
their batch mean and variance weigh long completions more.

Usage:
    out = compute_advantages(rewards_P_G, "grpo", eps=1e-6, unbiased=True)
    out.advantages, out.num_nan_rewards, out.num_zero_std_groups, out.metrics
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "ESTIMATORS",
    "AdvantageOutput",
    "compute_advantages",
    "dr_grpo",
    "grpo",
    "loo",
    "reinforce_pp",
    "reinforce_pp_baseline",
    "rloo",
]


@dataclass(frozen=True)
class AdvantageOutput:
    advantages: Tensor
    """[P, G] one advantage per completion; exactly 0 where the reward was NaN."""
    num_nan_rewards: int
    """Rewards that were NaN (failed or timed-out verifier), left out of all statistics."""
    num_zero_std_groups: int
    """Groups with at least one non-NaN reward, all equal ("zero-variance" groups). The
    group-baseline estimators give these groups all-zero advantages."""
    metrics: dict[str, float]
    """Detached scalars named "advantage/…"; statistics over completions with a non-NaN reward."""


# ---------------------------------------------------------------------------------------------
# Masked statistics. `valid` [P, G] is True where the reward is not NaN; `r` [P, G] has NaN
# replaced by 0 so that sums over the masked entries are plain sums.


def _masked(rewards: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Returns r [P, G] (float64, NaN -> 0), valid [P, G] bool and n [P, 1] valid counts."""
    valid = ~torch.isnan(rewards)
    r = torch.where(valid, rewards.double(), 0.0)
    n = valid.sum(dim=-1, keepdim=True)
    return r, valid, n


def _all_equal(r: Tensor, valid: Tensor, dim: int) -> Tensor:
    """True where the valid entries along `dim` exist and are all equal (exact comparison)."""
    high = torch.where(valid, r, -torch.inf).amax(dim=dim)
    low = torch.where(valid, r, torch.inf).amin(dim=dim)
    return high == low  # no valid entry: -inf == inf is False


def _group_mean(r: Tensor, n: Tensor) -> Tensor:
    return r.sum(dim=-1, keepdim=True) / n.clamp(min=1)


def _centred(r: Tensor, valid: Tensor, n: Tensor) -> Tensor:
    """r - mean of its group, exactly 0 in constant groups and at NaN rewards. [P, G]"""
    # mean([0.1, 0.1, 0.1]) = 0.10000000000000002 in float64, so `r - mean` alone would leave
    # 1e-17 noise in a constant group, which a std-normalised estimator would blow up.
    constant = _all_equal(r, valid, dim=-1).unsqueeze(-1)
    centred = torch.where(valid & ~constant, r - _group_mean(r, n), 0.0)
    return centred


def _var(sum_sq: Tensor, count: Tensor, unbiased: bool) -> Tensor:
    """sum_sq / (count - ddof), and 0 where count - ddof <= 0 (ddof = 1 if unbiased else 0)."""
    dof = count - int(unbiased)
    return torch.where(dof > 0, sum_sq / dof.clamp(min=1), 0.0)


def _whiten_divisor(var: Tensor, var_min: float) -> Tensor:
    """sqrt(max(var, var_min)), or 1 where that is 0 (then the numerator is 0 too)."""
    floored = var.clamp(min=var_min)
    return torch.where(floored > 0, floored.sqrt(), 1.0)


def _check_nonnegative(name: str, value: float) -> None:
    if not value >= 0.0:  # also rejects NaN
        raise ValueError(f"{name} must be >= 0, got {value}")


# ---------------------------------------------------------------------------------------------
# Estimators. Each takes rewards [P, G] (NaN allowed) and keyword-only parameters, and returns
# advantages [P, G] in the dtype of `rewards`.


def grpo(rewards: Tensor, *, eps: float = 1e-6, unbiased: bool = True) -> Tensor:
    """GRPO group z-score, DeepSeekMath (arXiv:2402.03300, §4.1.2 outcome supervision).

    A_i = (r_i - mean_g(r)) / (std_g(r) + eps), over the non-NaN rewards of the group.

    std is Bessel-corrected (N-1) when `unbiased` (TRL, verl, torch.std), else the population
    std. eps: verl, slime and SkyRL use 1e-6, TRL and ms-swift 1e-4, OpenRLHF 1e-9. Groups with
    fewer than 2 valid rewards or constant rewards give 0 (as TRL; verl instead divides a group
    of one by std=1 and returns A ≈ r).
    """
    _check_nonnegative("eps", eps)
    r, valid, n = _masked(rewards)
    centred = _centred(r, valid, n)
    std = _var(centred.square().sum(dim=-1, keepdim=True), n, unbiased).sqrt()
    # std = 0 only where centred = 0 (constant group, n < 2), so dividing by 1 there keeps 0/0
    # out even with eps = 0.
    advantages = centred / torch.where(std > 0, std + eps, 1.0)
    return advantages.to(rewards.dtype)


def dr_grpo(rewards: Tensor) -> Tensor:
    """Dr. GRPO, "Understanding R1-Zero-Like Training" (arXiv:2503.20783, §3.1).

    A_i = r_i - mean_g(r), over the non-NaN rewards of the group: GRPO without the std division,
    which up-weights groups whose rewards are nearly constant. (Tinker cookbook and prime-rl
    use this by default.) Pair it with a reduction that has no per-sequence length division.
    """
    r, valid, n = _masked(rewards)
    return _centred(r, valid, n).to(rewards.dtype)


def rloo(rewards: Tensor) -> Tensor:
    """REINFORCE Leave-One-Out, Ahmadian et al. (arXiv:2402.14740, §3.2 eq. 4 baseline).

    A_i = r_i - 1/(n-1) Σ_{j≠i} r_j = n/(n-1) · (r_i - mean_g(r)),
    n = number of non-NaN rewards in the group; groups with n < 2 give 0.
    """
    r, valid, n = _masked(rewards)
    n_float = n.to(torch.float64)  # int / int would give float32
    scale = torch.where(n > 1, n_float / (n_float - 1).clamp(min=1), 0.0)
    return (scale * _centred(r, valid, n)).to(rewards.dtype)


def loo(rewards: Tensor, *, eps: float = 1e-6, unbiased: bool = True) -> Tensor:
    """Leave-one-out baseline and leave-one-out std: NeMo-RL's default GRPO advantage.

    b_i = mean_{j≠i}(r_j),  s_i = std_{j≠i}(r_j)   (over the other non-NaN rewards of the group)
    A_i = (r_i - b_i) / (s_i + eps)   where s_i > 0,
    A_i =  r_i - b_i                  where s_i = 0 (no division: the others agree).

    With n non-NaN rewards in the group, s_i² = Σ_{j≠i} (r_j - b_i)² / (n - 2) when `unbiased`
    (the default: Bessel-corrected over the n - 1 others), else / (n - 1).
    NeMo-RL, `calculate_baseline_and_std_per_prompt` in nemo_rl/algorithms/utils.py (called by
    `GRPOAdvantageEstimator` with `use_leave_one_out_baseline=True`, `normalize_rewards=True`,
    eps=1e-6, dividing only where std > 0), takes the others' mean square minus their squared
    mean and multiplies it by num_valid / (num_valid - 1), num_valid = n - 1: the Bessel-corrected
    variance, i.e. `unbiased=True`. The baseline is RLOO's (arXiv:2402.14740).
    Small groups, as in NeMo-RL: n <= 1 gives 0 (NeMo sets the baseline to the reward); n = 2
    gives A_i = r_i - r_j undivided (one other: NeMo's 0 · inf = NaN std becomes 0).
    Unlike NeMo-RL: a NaN reward is left out like a sample with valid_mask 0 and gets
    advantage 0 (NeMo's matmul would spread the NaN over its group), and "the others agree" is
    an exact equality test rather than `std > 0`, so the rounding noise of a mean of equal
    rewards cannot be divided by eps. Constant groups give 0.
    Cost: O(P·G²) memory, fine for G up to a few hundred.
    """
    _check_nonnegative("eps", eps)
    r, valid, _ = _masked(rewards)
    num_samples = rewards.shape[-1]
    eye = torch.eye(num_samples, dtype=torch.bool, device=rewards.device)
    others = valid.unsqueeze(1) & ~eye  # [P, G_i, G_j]: j is a valid sample other than i
    r_others = r.unsqueeze(1).expand_as(others)
    num_others = others.sum(dim=-1)  # [P, G]
    baseline = (r_others * others).sum(dim=-1) / num_others.clamp(min=1)
    deviation = torch.where(others, r_others - baseline.unsqueeze(-1), 0.0)
    std = _var(deviation.square().sum(dim=-1), num_others, unbiased).sqrt()
    std = torch.where(_all_equal(r_others, others, dim=-1), 0.0, std)

    advantages = r - baseline
    advantages = torch.where(std > 0, advantages / (std + eps), advantages)
    constant = _all_equal(r, valid, dim=-1).unsqueeze(-1)
    keep = valid & (num_others > 0) & ~constant
    return torch.where(keep, advantages, 0.0).to(rewards.dtype)


def reinforce_pp(rewards: Tensor, *, var_min: float = 1e-8, unbiased: bool = False) -> Tensor:
    """REINFORCE++ with outcome rewards, Hu et al. (arXiv:2501.03262, §3 advantage normalisation).

    A_i = (r_i - mean_B(r)) / sqrt(max(var_B(r), var_min)), over every non-NaN reward of the
    batch: no per-prompt baseline, so with G = 1 it still gives non-zero advantages.

    OpenRLHF (`reinforce`) and NeMo-RL use the population variance (`unbiased=False`) with the
    rsqrt clamped at 1e-8; verl's `masked_whiten` uses the unbiased variance. A constant batch
    gives 0.
    """
    _check_nonnegative("var_min", var_min)
    r, valid, _ = _masked(rewards)
    r_flat, valid_flat = r.flatten(), valid.flatten()
    count = valid_flat.sum()
    mean = r_flat.sum() / count.clamp(min=1)
    deviation = torch.where(valid_flat, r_flat - mean, 0.0)
    var = _var(deviation.square().sum(), count, unbiased)
    advantages = deviation / _whiten_divisor(var, var_min)
    if _all_equal(r_flat, valid_flat, dim=0):  # drop the rounding noise of `r - mean`
        advantages = torch.zeros_like(advantages)
    return advantages.view_as(rewards).to(rewards.dtype)


def reinforce_pp_baseline(
    rewards: Tensor, *, var_min: float = 1e-8, unbiased: bool = False
) -> Tensor:
    """REINFORCE++-baseline, Hu et al. (arXiv:2501.03262): group mean, then batch whitening.

    x_i = r_i - mean_g(r)                       (per prompt, non-NaN rewards only)
    A_i = x_i / sqrt(max(var_B(x), var_min))    (over every non-NaN reward of the batch)

    OpenRLHF's `reinforce_baseline` also subtracts mean_B(x) before dividing; that mean is 0 by
    construction (every group sums to 0), so it is skipped here, which keeps constant groups at
    exactly 0 and every group summing to 0. `unbiased` and `var_min` as in `reinforce_pp`.
    """
    _check_nonnegative("var_min", var_min)
    r, valid, n = _masked(rewards)
    centred = _centred(r, valid, n)
    var = _var(centred.square().sum(), valid.sum(), unbiased)
    advantages = centred / _whiten_divisor(var, var_min)
    return advantages.to(rewards.dtype)


# ---------------------------------------------------------------------------------------------


def compute_advantages(rewards: Tensor, estimator: str = "grpo", **params: Any) -> AdvantageOutput:
    """Advantages [P, G] from rewards [P, G] (NaN = no verdict) with the named estimator.

    Args:
        rewards: [P, G] floating tensor; NaN marks a failed reward, ±inf is an error.
        estimator: a key of `ESTIMATORS`.
        **params: the estimator's keyword-only parameters (e.g. `eps`, `unbiased`).
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; valid: {', '.join(ESTIMATORS)}")
    fn = ESTIMATORS[estimator]
    accepted = [
        p.name for p in inspect.signature(fn).parameters.values() if p.kind is p.KEYWORD_ONLY
    ]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(
            f"unknown parameter(s) {unknown} for estimator {estimator!r}; "
            f"accepted: {accepted or 'none'}"
        )
    if rewards.dim() != 2 or not rewards.is_floating_point():
        raise ValueError(
            f"rewards must be a floating [P, G] tensor, got {rewards.dtype} "
            f"of shape {list(rewards.shape)}"
        )
    if torch.isinf(rewards).any():
        raise ValueError("rewards contain ±inf; use NaN to mark a failed reward")

    advantages = fn(rewards.detach(), **params)

    r, valid, _ = _masked(rewards.detach())
    num_groups, _ = rewards.shape
    num_nan = int((~valid).sum())
    num_zero_std = int(_all_equal(r, valid, dim=-1).sum())
    valid_advantages = advantages.detach().double()[valid]
    if valid_advantages.numel() > 0:
        stats = {
            "advantage/mean": float(valid_advantages.mean()),
            "advantage/std": float(valid_advantages.std(correction=0)),
            "advantage/min": float(valid_advantages.min()),
            "advantage/max": float(valid_advantages.max()),
        }
    else:
        stats = dict.fromkeys(
            ("advantage/mean", "advantage/std", "advantage/min", "advantage/max"), 0.0
        )
    metrics = {
        **stats,
        "advantage/nan_reward_frac": num_nan / max(rewards.numel(), 1),
        "advantage/zero_std_group_frac": num_zero_std / max(num_groups, 1),
    }
    return AdvantageOutput(
        advantages=advantages,
        num_nan_rewards=num_nan,
        num_zero_std_groups=num_zero_std,
        metrics=metrics,
    )


ESTIMATORS: dict[str, Callable[..., Tensor]] = {
    "grpo": grpo,
    "dr_grpo": dr_grpo,
    "rloo": rloo,
    "loo": loo,
    "reinforce_pp": reinforce_pp,
    "reinforce_pp_baseline": reinforce_pp_baseline,
}
