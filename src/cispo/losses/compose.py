"""compute_loss: objective -> correction -> KL/entropy -> reduction, with metrics.

The objective's per-token term comes from the registry (`registry.LOSSES`, by config class).

Order per token: loss_t = objective_t · w_t (correction, detached) · keep_t (OPSM)
+ kl_coef · KL_t - entropy_coef · H_t, then the reduction over active tokens.

Numerical safety: every input is replaced by 0 at inactive positions with torch.where before any
arithmetic, so a -inf or NaN logprob at a masked token reaches neither the loss nor the gradient
(x * mask would give 0 · inf = NaN; miles PR #1331). An active token with a non-finite value in
any provided input is counted in loss/nonfinite_tokens and, per `LossConfig.nonfinite`, either
dropped from the loss like a masked token ("zero") or raised ("raise"). The caller's num_tokens
is not adjusted for dropped tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

from cispo.losses import aggregate, corrections, metrics, regularizers
from cispo.losses.config import LossConfig
from cispo.losses.registry import entry_of, objective_inputs


@dataclass(frozen=True)
class LossInputs:
    """Per-token inputs, all [B, T]. Only `logprobs` should carry a gradient."""

    logprobs: Tensor
    """Current trainer policy log π_θ(token)."""
    loss_mask: Tensor
    """bool; True = the token counts in the loss."""
    advantages: Tensor | None = None
    """One value per sequence broadcast over T, or per token."""
    sampler_logprobs: Tensor | None = None
    """The policy that generated the tokens (inference engine)."""
    old_logprobs: Tensor | None = None
    """Trainer recompute before this round of updates."""
    ref_logprobs: Tensor | None = None
    """Reference policy, for the KL term."""
    weights: Tensor | None = None
    """Per-token weights for cross_entropy."""
    entropy: Tensor | None = None
    """Per-token policy entropy, computed by the caller, for the entropy term and metric."""


@dataclass(frozen=True)
class LossOutput:
    loss: Tensor
    """Scalar with grad."""
    metrics: dict[str, float]
    """Detached floats named "namespace/name"."""


def required_inputs(config: LossConfig) -> dict[str, str]:
    """Which LossInputs fields `config` reads, each with the reason (for error messages).

    The objective's own fields come from its registry entry (`registry.objective_inputs`).
    """
    need = objective_inputs(config.objective)
    if config.correction is not None:
        need["old_logprobs"] = "correction (w = exp(old - sampler))"
        need["sampler_logprobs"] = "correction (w = exp(old - sampler))"
    if config.opsm is not None:
        need["sampler_logprobs"] = "opsm"
        need["advantages"] = "opsm"
    if config.kl_coef > 0:
        need["ref_logprobs"] = "kl_coef > 0"
    if config.entropy_coef > 0:
        need["entropy"] = "entropy_coef > 0"
    return need


def _check_inputs(inputs: LossInputs, config: LossConfig) -> None:
    if inputs.loss_mask.dtype != torch.bool:
        raise ValueError(f"loss_mask must be bool (True = counts), got {inputs.loss_mask.dtype}")
    shape = inputs.logprobs.shape
    if len(shape) != 2:
        raise ValueError(f"logprobs must be [B, T], got shape {tuple(shape)}")
    for f in fields(inputs):
        t = getattr(inputs, f.name)
        if t is not None and t.shape != shape:
            raise ValueError(f"{f.name} has shape {tuple(t.shape)}, logprobs has {tuple(shape)}")
    for name, why in required_inputs(config).items():
        if getattr(inputs, name) is None:
            raise ValueError(f"LossInputs.{name} is required by {why}")


def compute_loss(
    inputs: LossInputs,
    config: LossConfig,
    *,
    num_tokens: float | None = None,
    num_sequences: float | None = None,
) -> LossOutput:
    """Per-token objective, correction, regularisers, reduction; see the module docstring.

    num_tokens / num_sequences: global normalisers over the whole optimizer batch (all
    micro-batches and ranks); None falls back to this call's local counts.
    """
    _check_inputs(inputs, config)
    provided = {f.name: getattr(inputs, f.name) for f in fields(inputs)}
    tensors = {k: v for k, v in provided.items() if v is not None and k != "loss_mask"}
    active = inputs.loss_mask
    finite = torch.ones_like(active)
    for t in tensors.values():
        finite = finite & torch.isfinite(t)
    bad = active & ~finite
    n_bad = int(bad.sum().item())
    if n_bad and config.nonfinite == "raise":
        names = [k for k, t in tensors.items() if bool((active & ~torch.isfinite(t)).any())]
        raise ValueError(
            f"{n_bad} active tokens have non-finite values in {names} "
            "(LossConfig.nonfinite='raise')"
        )
    mask = active & finite
    x = {k: torch.where(mask, t, t.new_zeros(())) for k, t in tensors.items()}

    term = entry_of(config.objective).term(x, mask, config.objective)
    loss_t, coef = term.loss, term.grad_coef
    out_metrics = dict(term.metrics)

    if config.correction is not None:
        c = config.correction
        w = corrections.correction_weight(
            x["old_logprobs"],
            x["sampler_logprobs"],
            mask,
            kind=c.kind,
            level=c.level,
            sequence_statistic=c.sequence_stat,
            ratio_min=c.ratio_min,
            ratio_max=c.ratio_max,
        )
        loss_t, coef = loss_t * w, coef * w
        out_metrics.update(metrics.mean_metric("correction/weight_mean", w, mask))
    if config.opsm is not None:
        keep = corrections.opsm_keep_mask(
            x["logprobs"], x["sampler_logprobs"], x["advantages"], mask, delta=config.opsm.delta
        )
        loss_t, coef = torch.where(keep, loss_t, 0.0), torch.where(keep, coef, 0.0)
        out_metrics.update(metrics.mean_metric("opsm/dropped_token_frac", (~keep).float(), mask))
    if config.kl_coef > 0:
        kl = regularizers.kl_penalty(
            x["logprobs"], x["ref_logprobs"], estimator=config.kl_estimator
        )
        loss_t = loss_t + config.kl_coef * kl
        out_metrics.update(metrics.mean_metric(f"kl/ref_{config.kl_estimator}", kl, mask))
    if config.entropy_coef > 0:
        loss_t = loss_t + regularizers.entropy_bonus(x["entropy"], coef=config.entropy_coef)

    loss = aggregate.reduce(
        config.reduction,
        loss_t,
        mask,
        num_tokens=num_tokens,
        num_sequences=num_sequences,
        max_len=config.max_len,
    )
    if "entropy" in x:
        out_metrics.update(metrics.mean_metric("entropy/mean", x["entropy"], mask))
    if "sampler_logprobs" in x:
        trainer = x.get("old_logprobs", x["logprobs"])
        out_metrics.update(metrics.mismatch_metrics(trainer, x["sampler_logprobs"], mask))
        out_metrics.update(
            metrics.fork_token_metrics(
                coef, x["sampler_logprobs"], mask, threshold=config.fork_prob_threshold
            )
        )
    out_metrics["loss/value"] = float(loss.detach().item())
    out_metrics["loss/active_tokens"] = float(mask.sum().item())
    out_metrics["loss/nonfinite_tokens"] = float(n_bad)
    return LossOutput(loss=loss, metrics=out_metrics)
