"""make_loss_config: a LossConfig from a Tinker-style `loss_fn` name and flat `loss_fn_config`.

Tinker semantics by default: ratios anchored on the sampler logprobs, reduction "sum", and
Tinker's absolute `clip_low_threshold` / `clip_high_threshold` (defaults: ppo 0.8/1.2,
cispo 0.0/4.0). Our own keys (anchor, reduction, corrections, KL, entropy, ...) go in the same
dict or as keyword overrides. Unknown keys are errors that list the valid ones.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cispo.losses.config import (
    CispoConfig,
    CorrectionConfig,
    CrossEntropyConfig,
    DroConfig,
    ImportanceSamplingConfig,
    LossConfig,
    ObjectiveConfig,
    OPSMConfig,
    PPOConfig,
    ReinforceConfig,
)

_COMMON_KEYS = (
    "reduction",
    "max_len",
    "kl_coef",
    "kl_estimator",
    "entropy_coef",
    "nonfinite",
    "fork_prob_threshold",
    "correction",  # "tis" | "mis" | None
    "correction_level",
    "correction_sequence_stat",
    "correction_ratio_min",
    "correction_ratio_max",
    "opsm_delta",  # float | None
)
_TINKER_CLIP = ("clip_low_threshold", "clip_high_threshold")

# Objective-specific keys per loss_fn (the registry names in cispo.losses.LOSSES).
OBJECTIVE_KEYS: dict[str, tuple[str, ...]] = {
    "cispo": ("anchor", *_TINKER_CLIP, "ratio_min", "ratio_max", "ratio_level", "allow_degenerate"),
    "ppo": ("anchor", *_TINKER_CLIP, "eps_low", "eps_high", "dual_clip_c", "ratio_level"),
    "gspo": ("anchor", *_TINKER_CLIP, "eps_low", "eps_high", "dual_clip_c"),
    "importance_sampling": ("anchor", *_TINKER_CLIP),
    "reinforce": (),
    "cross_entropy": (),
    "dro": ("anchor", "beta"),
}


def _pick_band(cfg: dict[str, Any], absolute: tuple[str, str], ours: tuple[str, str]) -> None:
    """Tinker's absolute keys and our own name the same bound; refuse both at once."""
    for a, o in zip(absolute, ours, strict=True):
        if a in cfg and o in cfg:
            raise ValueError(f"pass either {a!r} or {o!r}, not both")


def _objective(loss_fn: str, cfg: dict[str, Any]) -> ObjectiveConfig:
    anchor = cfg.get("anchor", "sampler")
    if loss_fn == "cispo":
        _pick_band(cfg, _TINKER_CLIP, ("ratio_min", "ratio_max"))
        return CispoConfig(
            ratio_min=float(cfg.get("clip_low_threshold", cfg.get("ratio_min", 0.0))),
            ratio_max=float(cfg.get("clip_high_threshold", cfg.get("ratio_max", 4.0))),
            anchor=anchor,
            ratio_level=cfg.get("ratio_level", "token"),
            allow_degenerate=bool(cfg.get("allow_degenerate", False)),
        )
    if loss_fn in ("ppo", "gspo"):
        _pick_band(cfg, _TINKER_CLIP, ("eps_low", "eps_high"))
        default = PPOConfig.gspo() if loss_fn == "gspo" else PPOConfig.from_tinker()
        eps_low = cfg.get("eps_low", default.eps_low)
        eps_high = cfg.get("eps_high", default.eps_high)
        if "clip_low_threshold" in cfg:
            eps_low = 1.0 - float(cfg["clip_low_threshold"])
        if "clip_high_threshold" in cfg:
            eps_high = float(cfg["clip_high_threshold"]) - 1.0
        return PPOConfig(
            eps_low=float(eps_low),
            eps_high=float(eps_high),
            dual_clip_c=cfg.get("dual_clip_c"),
            anchor=anchor,
            ratio_level=cfg.get("ratio_level", default.ratio_level),
        )
    if loss_fn == "importance_sampling":
        return ImportanceSamplingConfig(
            anchor=anchor,
            ratio_min=float(cfg.get("clip_low_threshold", 0.0)),
            ratio_max=float(cfg.get("clip_high_threshold", float("inf"))),
        )
    if loss_fn == "dro":
        if "beta" not in cfg:
            raise ValueError("loss_fn='dro' needs loss_fn_config['beta'] (Tinker's DRO key)")
        return DroConfig(beta=float(cfg["beta"]), anchor=anchor)
    if loss_fn == "reinforce":
        return ReinforceConfig()
    return CrossEntropyConfig()


def make_loss_config(
    loss_fn: str,
    loss_fn_config: Mapping[str, Any] | None = None,
    *,
    reduction: str | None = None,
    **overrides: Any,
) -> LossConfig:
    """Build a LossConfig. `overrides` take the same keys as `loss_fn_config` and win over it.

    Raises ValueError for an unknown loss_fn or key, naming it and listing the valid ones.
    """
    if loss_fn not in OBJECTIVE_KEYS:
        raise ValueError(f"unknown loss_fn {loss_fn!r}; valid: {sorted(OBJECTIVE_KEYS)}")
    cfg: dict[str, Any] = {**(loss_fn_config or {}), **overrides}
    if reduction is not None:
        cfg["reduction"] = reduction
    valid = set(_COMMON_KEYS) | set(OBJECTIVE_KEYS[loss_fn])
    for key in cfg:
        if key not in valid:
            raise ValueError(
                f"unknown key {key!r} for loss_fn={loss_fn!r}; valid keys: {sorted(valid)}"
            )
    correction_keys = [k for k in cfg if k.startswith("correction_")]
    correction: CorrectionConfig | None = None
    if cfg.get("correction") is not None:
        correction = CorrectionConfig(
            kind=cfg["correction"],
            level=cfg.get("correction_level", "token"),
            sequence_stat=cfg.get("correction_sequence_stat", "geometric_mean"),
            ratio_min=float(cfg.get("correction_ratio_min", 0.0)),
            ratio_max=float(cfg.get("correction_ratio_max", 2.0)),
        )
    elif correction_keys:
        raise ValueError(f"{correction_keys} given but correction is None; set 'correction'")
    opsm_delta = cfg.get("opsm_delta")
    return LossConfig(
        loss_fn=loss_fn,
        objective=_objective(loss_fn, cfg),
        reduction=cfg.get("reduction", "sum"),
        max_len=cfg.get("max_len"),
        correction=correction,
        opsm=None if opsm_delta is None else OPSMConfig(delta=float(opsm_delta)),
        kl_coef=float(cfg.get("kl_coef", 0.0)),
        kl_estimator=cfg.get("kl_estimator", "k3"),
        entropy_coef=float(cfg.get("entropy_coef", 0.0)),
        nonfinite=cfg.get("nonfinite", "zero"),
        fork_prob_threshold=float(cfg.get("fork_prob_threshold", 0.1)),
    )
